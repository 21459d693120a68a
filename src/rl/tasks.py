"""Toy tasks with exact rewards, chosen by ``[rl] task`` in the TOML.

Every task maps a string of random digits to an answer string of a known length. Prompts have a
fixed token length (``<bos>`` + digits + ``>``), so a batch needs no padding and the TorchTitan
model's plain causal attention is exact. The reward is the share of answer positions right among
the first tokens of the completion (an early EOS forfeits the positions after it; tokens past
the answer are ignored), so a random policy already earns a little and GRPO has a gradient from
step one. There is no reward for stopping: in our runs a tiny policy that learned the answer
would still drift away from emitting EOS, and a group with no spread left teaches nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from checkpointing import ConfigError

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    length: int
    transform: Callable[[str], str]
    """digits -> expected answer."""
    alphabet: str = DIGITS
    """Digits a prompt draws from: fewer digits, denser reward, faster learning."""

    @property
    def prompt_length(self) -> int:
        return self.length + 2  # <bos> digits '>'

    @property
    def answer_length(self) -> int:
        return len(self.transform("0" * self.length))

    def sample(self, rng: random.Random) -> Problem:
        digits = "".join(rng.choice(self.alphabet) for _ in range(self.length))
        return Problem(prompt=digits + ">", answer=self.transform(digits))

    def reward(self, problem: Problem, completion: str) -> float:
        """Correct positions / answer length: 1.0 exactly when the answer is right."""
        answer = problem.answer
        # A short completion (an early EOS) scores its missing positions 0.
        return sum(a == c for a, c in zip(answer, completion, strict=False)) / len(answer)


_TRANSFORMS: dict[str, Callable[[int], Callable[[str], str]]] = {
    "reverse": lambda n: lambda d: d[::-1],
    "copy": lambda n: lambda d: d,
    "sort": lambda n: lambda d: "".join(sorted(d)),
    # Ignores the prompt: the easiest signal, useful to check the loop itself learns.
    "pattern": lambda n: lambda d: LETTERS[:n],
}


def available_tasks() -> list[str]:
    return sorted(_TRANSFORMS)


def get_task(name: str, length: int, alphabet_size: int = 10) -> Task:
    if name not in _TRANSFORMS:
        raise ConfigError(f"rl.task = {name!r} is not a known task; allowed: {', '.join(available_tasks())}")
    if not 2 <= alphabet_size <= len(DIGITS):
        raise ConfigError(f"rl.alphabet_size = {alphabet_size}; allowed: 2 to {len(DIGITS)}")
    return Task(name=name, length=length, transform=_TRANSFORMS[name](length), alphabet=DIGITS[:alphabet_size])


class PromptSampler:
    """The job's "dataloader": an endless stream of problems, resumable as a Stateful.

    Batch ``i`` depends only on (seed, i), so a resumed run draws exactly the batches the
    uninterrupted run would have drawn."""

    def __init__(self, task: Task, seed: int):
        self.task = task
        self.seed = seed
        self.batches_drawn = 0

    def next_batch(self, n: int) -> list[Problem]:
        rng = random.Random(f"{self.seed}/{self.batches_drawn}")
        self.batches_drawn += 1
        return [self.task.sample(rng) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])
