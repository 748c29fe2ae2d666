"""Each speed option must not change the numbers: bf16/fp16 autocast, channels_last_3d, torch.compile; plus the runtime
knobs (brats_unet.runtime) and the SLURM launcher config."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_overrides
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from brats_unet.models.unet3d import UNet3D
from brats_unet.runtime import configure_runtime
from brats_unet.training.build import build_module
from brats_unet.training.fit import train
from brats_unet.training.losses import CombinedLoss, DiceLoss, RegionDiceBCELoss
from brats_unet.training.module import BratsModule
from brats_unet.utils import BratsError

FILTERS = [4, 8, 16]


def _batch(seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, size, size, size, generator=g), torch.randint(0, 4, (2, size, size, size), generator=g)


def _net(out_channels: int, seed: int = 0, **kwargs) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(4, out_channels, FILTERS, norm="instance", **kwargs)


# ---- mixed precision ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_cls", [RegionDiceBCELoss, CombinedLoss, DiceLoss])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_loss_is_close_to_fp32_and_computed_in_fp32(loss_cls: type, seed: int) -> None:
    """Same net, same batch: the bf16-autocast loss within 2e-3 (relative) of the fp32 loss.

    Why 2e-3: bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3). The logits do carry percent-level bf16
    errors (asserted below, so autocast really ran), but they are of random sign and the loss averages ~65k voxels,
    which leaves ~1e-4 (measured 1e-5..2.5e-4 on these seeds): 2e-3 is ~10x that, yet below a single bf16 rounding
    of the loss itself. The dtype assert catches a loss reduced in bf16 (the losses compute Dice/BCE in float32).
    """
    loss_fn = loss_cls()
    net = _net(loss_fn.num_outputs, seed)
    x, y = _batch(seed)
    with torch.no_grad():
        logits32 = net(x)
        loss32 = loss_fn(logits32, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16 = net(x)
            loss16 = loss_fn(logits16, y)
    assert logits16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert not torch.equal(logits16.float(), logits32)  # bf16 really was used for the convolutions
    assert torch.allclose(logits16.float(), logits32, rtol=0, atol=0.1 * logits32.abs().max().item())
    assert abs(loss16.item() - loss32.item()) <= 2e-3 * abs(loss32.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA device")
def test_fp16_autocast_loss_is_close_to_fp32_on_cuda() -> None:
    loss_fn = RegionDiceBCELoss()
    net = _net(loss_fn.num_outputs).cuda()
    x, y = (t.cuda() for t in _batch())
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = False  # compare against true fp32, not TF32
        try:
            loss32 = loss_fn(net(x), y)
        finally:
            torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cuda", dtype=torch.float16):
            logits16 = net(x)
            loss16 = loss_fn(logits16, y)
    assert logits16.dtype == torch.float16 and loss16.dtype == torch.float32
    # fp16 has 11 significant bits, finer than bf16's 8: the bf16 bound holds with room to spare.
    assert abs(loss16.item() - loss32.item()) <= 2e-3 * abs(loss32.item())


@pytest.mark.slow
def test_training_runs_with_bf16_mixed_precision(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"), "trainer.precision=bf16-mixed",
                         "debug=fast_dev_run"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


# ---- channels_last_3d ---------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_output_and_gradients() -> None:
    plain = _net(3)
    fast = _net(3, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.encoders[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x, y = _batch(size=16)
    loss_fn = RegionDiceBCELoss()
    out_plain, out_fast = plain(x), fast(x)
    assert torch.allclose(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    loss_fn(out_plain, y).backward()
    loss_fn(out_fast, y).backward()
    g_plain, g_fast = plain.encoders[0].conv1.weight.grad, fast.encoders[0].conv1.weight.grad
    assert torch.allclose(g_fast, g_plain, rtol=1e-3, atol=1e-5 * g_plain.abs().max().item())


def _module(**kwargs) -> BratsModule:
    net = _net(3)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return BratsModule(net, RegionDiceBCELoss(), optimizer, patch_size=(16, 16, 16), **kwargs)


def test_runtime_channels_last_builds_a_channels_last_net_that_predicts_the_same(tmp_path: Path) -> None:
    base = tiny_overrides(Path("data"), Path("cache"), tmp_path)
    plain = build_module(compose_train(base), in_channels=4)
    fast = build_module(compose_train([*base, "runtime.channels_last=true"]), in_channels=4)
    assert fast.net.encoders[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not plain.net.encoders[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    fast.load_state_dict(plain.state_dict())
    plain.eval(), fast.eval()  # no dropout
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)


# ---- torch.compile ------------------------------------------------------------------------------------------------
@functools.cache
def _compile_problem() -> str | None:
    """Why torch.compile cannot run here (no C++ compiler for inductor, unsupported Python...), or None."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4))
    except Exception as e:  # torch raises a variety of backend errors
        return f"torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def test_compiled_module_saves_the_same_state_dict_keys_and_loads_either_way() -> None:
    plain, compiled = _module(), _module(compile=True)
    assert type(compiled._forward_net).__name__ == "OptimizedModule"  # compile was requested (it compiles lazily)
    keys = list(plain.state_dict())
    assert list(compiled.state_dict()) == keys
    assert not any("_orig_mod" in k for k in keys)
    compiled.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(compiled.state_dict(), strict=True)


def test_runtime_compile_config_key_keeps_checkpoint_keys(tmp_path: Path) -> None:
    base = tiny_overrides(Path("r"), Path("c"), tmp_path)
    plain = build_module(compose_train(base), in_channels=4)
    compiled = build_module(compose_train([*base, "runtime.compile=true"]), in_channels=4)
    assert type(compiled._forward_net).__name__ == "OptimizedModule"
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compiled_net_gives_the_same_output() -> None:
    problem = _compile_problem()
    if problem:
        pytest.skip(problem)
    net = UNet3D(4, 3, [4, 8], norm="instance").eval()
    compiled = torch.compile(net)
    x, _ = _batch(size=16)
    with torch.no_grad():
        assert torch.allclose(compiled(x), net(x), rtol=1e-4, atol=1e-5)


# ---- runtime knobs ------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_runtime():
    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.set_float32_matmul_precision(saved[2])


def test_configure_runtime_sets_threads_cudnn_and_matmul_precision(restore_runtime) -> None:
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    state = configure_runtime(threads=1, cudnn_benchmark=True, matmul_precision="high")
    assert torch.get_num_threads() == 1 and torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == "high"
    assert state == {"threads": 1, "cudnn_benchmark": True, "matmul_precision": "high", "channels_last": False,
                     "compile": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, cudnn_benchmark=null turns the autotuner on")
def test_configure_runtime_with_nones_changes_nothing(restore_runtime) -> None:
    before = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    configure_runtime(None, None, None)
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threads": 0}, r"runtime\.threads must be a positive integer or null, got 0"),
    ({"threads": True}, r"runtime\.threads must be a positive integer"),
    ({"matmul_precision": "tf32"}, r"runtime\.matmul_precision must be one of \['highest', 'high', 'medium'\]"),
    ({"channels_last": "yes"}, r"runtime\.channels_last must be auto, true or false, got 'yes'"),
    ({"compile": "auto"}, r"runtime\.compile must be true or false, got 'auto'"),
])
def test_configure_runtime_rejects_bad_values(restore_runtime, kwargs: dict, message: str) -> None:
    with pytest.raises(BratsError, match=message):
        configure_runtime(**kwargs)


# ---- SLURM launcher -----------------------------------------------------------------------------------------------
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher not installed (pip install -e .[slurm])",
)


@needs_submitit
def test_slurm_launcher_config_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=paper_final", "hydra/launcher=slurm",
                                                      "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 1440 and launcher.nodes == 1
    assert cfg.model.filters[-1] == 512  # the job config is untouched by the launcher choice


@pytest.mark.slow
@needs_submitit
def test_slurm_launcher_composes_through_the_cli(tmp_path: Path) -> None:
    # Hydra refuses `-m` together with `--cfg`; the launcher node composes the same either way.
    cmd = [sys.executable, "-m", "brats_unet.cli.train", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
           "--cfg", "hydra"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SlurmLauncher" in result.stdout and "gpus_per_node: 4" in result.stdout
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()  # printed, launched nothing
