"""Learning-rate schedules as pure functions of the optimizer step (resume-exact), wrapped in LambdaLR.

LambdaLR passes the 0-based step count `s`; the LR used for update s is TargetLR * factor(s). Warm-up follows the
paper's eq. 4 with CurrentStep = s + 1, so the very first update is not at LR 0 and update warmup_steps - 1 reaches
TargetLR. Cosine decay is eq. 5, with an optional floor min_lr_ratio (0 = the paper), held once s >= total_steps.
Step it once per optimizer step (Lightning: interval "step").
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"scheduler: total_steps must be > 0, got {total_steps} (set trainer.max_steps or "
                         "trainer.max_epochs)")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"scheduler.warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")


def warmup_factor(step: int, warmup_steps: int) -> float | None:
    """Eq. 4 with CurrentStep = step + 1; None once warm-up is over."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    warm = warmup_factor(step, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0


def step_decay_factor(step: int, warmup_steps: int = 0, step_size: int = 1000, gamma: float = 0.5) -> float:
    warm = warmup_factor(step, warmup_steps)
    return warm if warm is not None else gamma ** ((step - warmup_steps) // step_size)


def constant_factor(step: int, warmup_steps: int = 0) -> float:
    warm = warmup_factor(step, warmup_steps)
    return warm if warm is not None else 1.0


# functools.partial (not a lambda) keeps the schedulers picklable; LambdaLR's state_dict then stores only the step
# count, and the schedule itself is rebuilt from the config on resume.
def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    _check(total_steps, warmup_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, partial(warmup_cosine_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                                       min_lr_ratio=min_lr_ratio))


def step_decay(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, step_size: int = 1000,
               gamma: float = 0.5) -> LambdaLR:
    _check(total_steps, warmup_steps)
    if step_size <= 0:
        raise ValueError(f"scheduler.step_size must be > 0, got {step_size}")
    if gamma <= 0:
        raise ValueError(f"scheduler.gamma must be > 0, got {gamma}")
    return LambdaLR(optimizer, partial(step_decay_factor, warmup_steps=warmup_steps, step_size=step_size,
                                       gamma=gamma))


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    _check(total_steps, warmup_steps)
    return LambdaLR(optimizer, partial(constant_factor, warmup_steps=warmup_steps))
