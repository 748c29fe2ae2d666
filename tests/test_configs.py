"""Every config combination a user can type builds, and every command the README prints composes."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate

from brats_unet.training.build import build_module

CONF = Path(__file__).parents[1] / "conf"
ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def build_everything(overrides: list[str]) -> None:
    """Compose, then instantiate the DataModule, loss, network (on the meta device: no memory), optimiser and
    scheduler exactly as brats-train does; any TypeError/ValueError surfaces here."""
    cfg = compose_train([*overrides, "paths.output_dir=unused"])
    datamodule = instantiate(cfg.data, output_dir="unused", seed=cfg.seed, _recursive_=False)
    with torch.device("meta"):
        module = build_module(cfg, in_channels=datamodule.num_channels)
    optimizer = module.optimizer_factory(params=[torch.nn.Parameter(torch.zeros(1))])
    module.scheduler_factory(optimizer, total_steps=1000)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_with_every_scheduler_loss_and_model(experiment: str) -> None:
    # Every loss x model pair, and every scheduler: the groups do not interact beyond the keys an experiment sets
    # (paper_final's scheduler keys, paper_combined's loss keys), which these combinations all exercise.
    for loss, model in itertools.product(LOSSES, MODELS):
        build_everything([f"experiment={experiment}", f"loss={loss}", f"model={model}"])
    for scheduler in SCHEDULERS:
        build_everything([f"experiment={experiment}", f"scheduler={scheduler}"])


@pytest.mark.parametrize("data", DATA)
def test_every_dataset_config_builds_with_both_heads(data: str) -> None:
    for loss in ("combined", "region"):
        build_everything([f"data={data}", "preprocess=modern", f"loss={loss}", "model=unet3d_small"])


def readme_train_commands() -> list[str]:
    """Every `brats-train ...` command in the README and docs/*.md (code blocks and tables)."""
    text = "\n".join(page.read_text() for page in DOCS)
    commands = re.findall(r"`(brats-train [^`]+)`", text)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()
                     if line.strip().startswith("brats-train ")]
    return sorted(set(commands))


def test_every_readme_train_command_composes() -> None:
    commands = readme_train_commands()
    assert len(commands) >= 10 and "brats-train experiment=paper_2d" in commands
    for command in commands:
        words = [w for w in shlex.split(command)[1:] if w != "-m" and "=" in w and not w.startswith("hydra.")]
        # A sweep's first value per key (loss.alpha=0,0.25 -> 0); `[a,b]` lists stay whole.
        words = [re.sub(r"^([^=]+)=([^\[,]+),.*$", r"\1=\2", w) for w in words]
        if any(w.startswith(("hparams_search=", "hydra/launcher=")) for w in words):
            continue  # plugin configs: composed by their own tests (test_train.py, test_speed_options.py)
        try:
            cfg = compose_train([*words, "paths.output_dir=unused"])
        except Exception as e:  # noqa: BLE001  (name the README command in the failure)
            raise AssertionError(f"README command does not compose: {command}: {e}") from e
        assert cfg.task_name, command


def test_paper_experiments_hold_out_a_test_split_and_2d_has_its_own_task() -> None:
    for experiment in (e for e in EXPERIMENTS if e.startswith("paper_")):
        assert compose_train([f"experiment={experiment}"]).data.test_fraction == 0.1, experiment
    two_d = compose_train(["experiment=paper_2d"])
    assert two_d.task_name == "paper_2d" and two_d.model._target_.endswith("UNet2D")
    assert compose_train(["experiment=paper_final", "scheduler=step"]).scheduler._target_.endswith("step_decay")
