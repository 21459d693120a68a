"""A backend's options table, documented from its own dataclass.

The field names, types and defaults come from the dataclass, and each field's text from the
docstring written under it (read from the source with ``ast``), so ``ckpt backends`` and the
configuration reference say exactly what the code accepts, for plugins as for built-ins.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptionRow:
    name: str
    type: str
    default: str
    doc: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after ``name: type = default``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:], strict=False):  # each node with the one after it
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def option_rows(cls: type) -> list[OptionRow]:
    docs = field_docs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    return [
        OptionRow(f.name, _type_name(hints.get(f.name, f.type)), _default(f), docs.get(f.name, ""))
        for f in dataclasses.fields(cls)
    ]
