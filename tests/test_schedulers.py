"""LR schedules against the paper's eqs 4-5 by hand, and resume exactness."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR

from brats_unet.training.schedulers import constant, step_decay, warmup_cosine

LR = 0.1


def run(make, steps: int, **kw) -> list[float]:
    """LR used by optimizer updates 0..steps-1 when the scheduler is stepped after each update."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = make(opt, **kw)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_eq_4_5() -> None:
    lrs = run(warmup_cosine, 16, total_steps=12, warmup_steps=4)
    # Warm-up (eq 4, CurrentStep = s + 1): 0.1 * 1/4, 2/4, 3/4, 4/4.
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    # Eq 5 with progress (s - 4) / (12 - 4): s=4 -> cos 0 -> 0.1; s=6 -> 0.1 (1 + cos(pi/4)) / 2; s=8 -> 0.05;
    # s=10 -> 0.1 (1 + cos(3 pi/4)) / 2
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 * (1 + 0.7071067811865476) / 2)
    assert lrs[8] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.1 * (1 - 0.7071067811865476) / 2)
    assert lrs[12:] == pytest.approx([0.0] * 4, abs=1e-12)  # held at the end, not rising again


def test_warmup_cosine_floor_and_no_warmup() -> None:
    lrs = run(warmup_cosine, 20, total_steps=10, warmup_steps=0, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # progress 5/10: cosine factor 1/2
    assert lrs[10:] == pytest.approx([0.01] * 10)
    assert math.isclose(lrs[9], 0.1 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.9)) / 2))


def test_step_decay() -> None:
    lrs = run(step_decay, 10, total_steps=100, warmup_steps=2, step_size=3, gamma=0.5)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_constant() -> None:
    assert run(constant, 5, total_steps=10, warmup_steps=3) == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1])
    assert run(constant, 3, total_steps=10) == pytest.approx([0.1] * 3)


@pytest.mark.parametrize("make", [warmup_cosine, step_decay, constant])
def test_argument_errors(make) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="total_steps must be > 0, got 0"):
        make(opt, total_steps=0)
    with pytest.raises(ValueError, match=r"scheduler.warmup_steps must be in \[0, total_steps=10\), got 10"):
        make(opt, total_steps=10, warmup_steps=10)


def test_resume_is_exact() -> None:
    def build() -> tuple[torch.optim.Optimizer, LambdaLR]:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=LR)
        return opt, warmup_cosine(opt, total_steps=30, warmup_steps=5, min_lr_ratio=0.05)

    def steps(opt: torch.optim.Optimizer, sched: LambdaLR, n: int) -> list[float]:
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    opt, sched = build()
    full = steps(opt, sched, 25)

    opt, sched = build()
    first = steps(opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    opt, sched = build()  # fresh objects, as on a restart
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    assert first + steps(opt, sched, 18) == full  # bit-identical, not approximately


def test_optimizer_and_scheduler_configs() -> None:
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        cfgs = {name: compose(overrides=[f"+optimizer={opt}", f"+scheduler={name}"])
                for name, opt in (("warmup_cosine", "adam"), ("step", "adamw"), ("constant", "adam"))}
    params = [torch.nn.Parameter(torch.zeros(1))]
    adam = instantiate(cfgs["warmup_cosine"].optimizer)(params)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-4 and adam.defaults["weight_decay"] == 0
    adamw = instantiate(cfgs["step"].optimizer)(params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 3e-4
    assert adamw.defaults["weight_decay"] == 1e-2
    sched = instantiate(cfgs["warmup_cosine"].scheduler)(adam, total_steps=1000)
    assert adam.param_groups[0]["lr"] == pytest.approx(1e-4 / 100)  # warmup_steps 100: first update at lr/100
    assert isinstance(sched, LambdaLR)
    instantiate(cfgs["step"].scheduler)(adamw, total_steps=10)
    instantiate(cfgs["constant"].scheduler)(adam, total_steps=10)
