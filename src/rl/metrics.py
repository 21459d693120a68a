"""What the job measures, per step: a JSONL record, a PNG at the end, and a summary.

The JSONL is append-only and flushed every step, so a killed run keeps its history; a resumed run
drops the records past the step it resumed from (those steps are redone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

WINDOW = 10


class MetricsLog:
    def __init__(self, path: str, resume_step: int):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step] if resume_step > 0 else []
        self.records: list[dict[str, Any]] = kept
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
    return records


def reward_margin(records: Iterable[dict[str, Any]], window: int = WINDOW) -> dict[str, float]:
    """Mean reward of the last ``window`` steps minus that of the first ``window``."""
    rewards = [r["reward_mean"] for r in sorted(records, key=lambda r: r["step"])]
    if not rewards:
        return {"first": float("nan"), "last": float("nan"), "margin": float("nan")}
    first = sum(rewards[:window]) / len(rewards[:window])
    last = sum(rewards[-window:]) / len(rewards[-window:])
    return {"first": first, "last": last, "margin": last - first}


def plot(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Reward and weight-sync time per step (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    reward = [r["reward_mean"] for r in records]
    smooth = [sum(reward[max(0, i - WINDOW + 1) : i + 1]) / len(reward[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(reward))]
    publish = [1e3 * r["publish_seconds"] for r in records]
    pull = [1e3 * r["sync_seconds"] for r in records]
    fig, (ax_r, ax_s) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_r.plot(steps, reward, ".", alpha=0.4, label="mean reward")
    ax_r.plot(steps, smooth, "-", label=f"{WINDOW}-step mean")
    ax_r.set_ylabel("reward")
    ax_r.set_ylim(0, 1)
    ax_r.legend(loc="lower right")
    ax_r.set_title(title)
    ax_s.plot(steps, publish, label="trainer save (publish)")
    ax_s.plot(steps, pull, label="generator load (pull)")
    ax_s.set_ylabel("weight sync [ms]")
    ax_s.set_xlabel("step")
    ax_s.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
