"""Binding a plan to the receiving tensors, and the one batched copy that updates them.

Pieces of tied receiver keys (one tensor under two names) are written once. When the publisher
holds such keys as separate tensors (an export cast each key on its own), both are received and
compared before anything is written, as the memory backend does: equal, the tie stays truthful;
different, a StateMismatchError names them and the receiver is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..._compat import foreach_copy
from ...errors import StateMismatchError
from .plan import Piece, local_view


@dataclass
class Binding:
    targets: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    check_targets: list[torch.Tensor] = field(default_factory=list)
    check_sources: list[torch.Tensor] = field(default_factory=list)
    ties: list[tuple[str, str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(key, the key it is tied to, received values of each) for ties the publisher lacks."""

    def apply(self, source: str) -> None:
        foreach_copy(self.check_targets, self.check_sources)
        differ = [(key, primary) for key, primary, a, b in self.ties if not torch.equal(a, b)]
        if differ:
            keys = sorted({k for pair in differ for k in pair})
            raise StateMismatchError(
                f"{source}: the receiver ties {differ}, but the published version holds different values for them", keys
            )
        foreach_copy(self.targets, self.sources)


def bind(pieces: Iterable[tuple[Piece, torch.Tensor]], local: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> Binding:
    """``pieces``: each piece with the view of its received data. ``local``: the receiver's
    tensors by held name; a piece whose target is an alias of one is a tie check."""
    pieces = list(pieces)
    checked = {aliases[p.target] for p, _ in pieces if p.target not in local}
    scratch: dict[str, torch.Tensor] = {}
    binding = Binding()

    def scratch_for(key: str, like: str) -> torch.Tensor:
        if key not in scratch:
            target = local[like]
            scratch[key] = torch.empty(target.shape, dtype=target.dtype, device=target.device)
        return scratch[key]

    for piece, data in pieces:
        if piece.target in local:
            binding.targets.append(local_view(local[piece.target], piece.dst_box))
            binding.sources.append(data)
            if piece.target in checked:
                binding.check_targets.append(local_view(scratch_for(piece.target, piece.target), piece.dst_box))
                binding.check_sources.append(data)
        else:
            primary = aliases[piece.target]
            binding.check_targets.append(local_view(scratch_for(piece.target, primary), piece.dst_box))
            binding.check_sources.append(data)
    binding.ties = [(key, aliases[key], scratch[key], scratch[aliases[key]]) for key in scratch if key not in local]
    return binding
