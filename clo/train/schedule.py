"""The schedule of a run: stages of epochs, the data order, the learning rate, and where a step starts.

Everything here is a pure function of the settings and the position, so a resumed run replays the
schedule exactly from a checkpoint's `Position` (docs/paper.md "Training recipe": linear warmup
over the first 10% of steps, then linear decay to 0).
"""

import functools
import math
from dataclasses import dataclass

import torch

from clo.train.stages import Stage

# The peak learning rate when --lr is not given: the paper's recipe for its 7B models, except for the
# embedded default model (SmolLM2-135M, attention only, tens of steps), for which study.py's sweep for
# CLO on human-translated Swahili news at 64 pairs chose 1e-4 over 3e-4 (whose dev answers to English
# prompts were 94% empty or not English; an earlier sweep at 32 pairs, by NLL alone, chose 3e-4: docs/study.md).
PAPER_LR = 8e-6
DEFAULT_MODEL_LR = 1e-4


def default_lr(model: str, default_model: str) -> float:
    """--lr's default for a --model spec: DEFAULT_MODEL_LR for the embedded default model, else PAPER_LR."""
    return DEFAULT_MODEL_LR if model == default_model else PAPER_LR


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # next micro-batch within the epoch
    step: int = 0  # optimizer steps done, over the whole run


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then linear decay to 0."""
    warm = max(1, math.ceil(total * warmup))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


@functools.lru_cache(maxsize=1)  # called every step; the order changes once per epoch
def seeded_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The data order of one epoch: a pure function of (seed, stage, epoch), so a resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass(frozen=True)
class Schedule:
    """`examples` examples in micro-batches of `batch_size`, `grad_accum` micro-batches per optimizer
    step, every stage's epochs in turn; the last micro-batch of an epoch may be short."""

    stages: tuple[Stage, ...]
    examples: int
    batch_size: int
    grad_accum: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return sum(s.epochs for s in self.stages) * math.ceil(self.batches_per_epoch / self.grad_accum)

    def steps_from(self, start: Position):
        """Every optimizer step from `start` on, as (stage, epoch, range of micro-batch indices in the epoch)."""
        for s in range(start.stage, len(self.stages)):
            for epoch in range(start.epoch if s == start.stage else 0, self.stages[s].epochs):
                first = start.batch if (s, epoch) == (start.stage, start.epoch) else 0
                for b0 in range(first, self.batches_per_epoch, self.grad_accum):
                    yield s, epoch, range(b0, min(b0 + self.grad_accum, self.batches_per_epoch))

    def batch(self, stage: int, epoch: int, b: int) -> list[int]:
        """The example indices of micro-batch `b` of (stage, epoch)."""
        order = seeded_order(self.examples, self.seed, stage, epoch)
        return order[b * self.batch_size : (b + 1) * self.batch_size]
