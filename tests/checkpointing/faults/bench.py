"""A reader pointed at one step directory that is reset to a pristine copy before each
damage, so one test can try many damages cheaply and judge each load on its own."""

from __future__ import annotations

import os
import uuid

from checkpointing.commit import MANIFEST
from tests.checkpointing.faults.damage import files_of, restore
from tests.checkpointing.faults.versions import BASE_SEED, Side, assert_unchanged, snapshot

STEP = 1


def save_pristine(case: str, root: str, base, writer_states=None) -> str:
    """Commit version ``STEP`` under ``root``; returns its step directory."""
    writer = Side(case, root, f"p{uuid.uuid4().hex[:12]}", seed=BASE_SEED)
    if writer_states is not None:
        writer.ckpt.states.update(writer_states)
    writer.save_version(base, STEP)
    writer.close()
    return os.path.join(root, "checkpoint", f"step-{STEP}")


class Bench:
    def __init__(self, case: str, pristine: str, tmp_path, **cfg):
        self.pristine = pristine
        self.step_dir = str(tmp_path / "checkpoint" / f"step-{STEP}")
        restore(pristine, self.step_dir)
        self.reader = Side(case, str(tmp_path), f"c{uuid.uuid4().hex[:12]}", load_only=True, **cfg)

    def files(self) -> list[str]:
        return files_of(self.pristine)

    def path(self, rel: str) -> str:
        return os.path.join(self.step_dir, rel)

    def damaged_load(self, rel: str | None, damage) -> tuple[BaseException | None, bool]:
        """(error, loaded) after ``damage`` (to file ``rel``, or to the step directory when
        ``rel`` is None). On error, asserts the receiver is exactly as before the load."""
        restore(self.pristine, self.step_dir)
        damage(self.step_dir if rel is None else self.path(rel))
        before = snapshot(self.reader.model)
        ts_before = None if self.reader.train_state is None else (self.reader.train_state.step, list(self.reader.train_state.losses))
        loaded_before = self.reader.ckpt.loaded_step
        try:
            loaded = self.reader.ckpt.load()
        except Exception as e:  # judged by the caller
            what = f"failed load after damaging {rel or 'the step'}"
            assert_unchanged(self.reader.model, before, what)
            if ts_before is not None:
                now = (self.reader.train_state.step, list(self.reader.train_state.losses))
                assert now == ts_before, f"{what}: train_state changed {ts_before} -> {now}"
            assert self.reader.ckpt.loaded_step == loaded_before, f"{what}: loaded_step advanced"
            return e, False
        return None, loaded


def names_file(error: BaseException, rel: str) -> bool:
    path = getattr(error, "path", None) or ""
    return rel in str(error) or path.endswith(rel)


__all__ = ["Bench", "MANIFEST", "STEP", "names_file", "save_pristine"]
