"""`auto` precision and memory format (brats_unet.runtime): the decision fed explicit capabilities and timings, the
probe cache, and auto end to end in brats-train; a resumed bf16 run stays bit-exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_train, tiny_overrides

from brats_unet import runtime
from brats_unet.runtime import (
    LIGHTNING_PRECISION,
    Choice,
    Hardware,
    auto_precision,
    autocast,
    cached_probe,
    channels_last_wins,
    cpu_info,
    decide,
    detect,
    probe_input_shape,
    probe_key,
    resolve,
    run_device,
    training_device,
)
from brats_unet.training.fit import train
from brats_unet.training.network import probe_model
from brats_unet.utils import BratsError

ZEN4 = Hardware("cpu", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = Hardware("cpu", "Xeon", frozenset({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}))
HIDDEN_FLAGS = Hardware("cpu", "Xeon under KVM", frozenset({"avx2", "avx512f", "avx512_vnni"}))
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100", cuda_bf16=False)
FAST_CL = {"contiguous": 1.0, "channels_last": 0.5}
NO_GAIN = {"contiguous": 1.0, "channels_last": 1.0}
TINY_NET = probe_model({"_target_": "brats_unet.models.unet3d.UNet3D", "filters": [4, 8]}, 4, 3, [32, 32, 32], 2,
                       "cpu")


# ---- the decision --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hw", "precision", "why"), [
    (ZEN4, "bf16", "AVX512-BF16"),
    (SAPPHIRE_RAPIDS, "bf16", "AMX-BF16+AVX512-BF16"),
    (HIDDEN_FLAGS, "fp32", "no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32"),
    (A100, "bf16", "NVIDIA A100 has native bf16"),
    (V100, "fp16", "Tesla V100 lacks native bf16"),
    (Hardware("mps", "mps"), "fp32", "no auto speed-ups on mps"),
])
def test_auto_precision_follows_the_hardware(hw: Hardware, precision: str, why: str) -> None:
    assert auto_precision(hw) == (precision, why)
    assert decide(hw).precision == precision


def test_channels_last_needs_a_clear_win_in_the_probe() -> None:
    assert channels_last_wins(1.0, 0.89)
    assert not channels_last_wins(1.0, 0.91)  # within noise of a shared machine: keep the standard format
    assert decide(ZEN4, timings=FAST_CL).channels_last
    assert not decide(ZEN4, timings={"contiguous": 1.0, "channels_last": 1.2}).channels_last
    assert decide(ZEN4, timings=None) == Choice("bf16", False, {"precision": "AVX512-BF16",
                                                                 "channels_last": "not measured"})
    # another device type is never probed
    assert not decide(Hardware("mps", "mps"), timings=FAST_CL).channels_last


def test_every_explicit_setting_wins_over_auto() -> None:
    choice = decide(ZEN4, precision="fp32", channels_last=False, timings=FAST_CL)
    assert choice == Choice("fp32", False, {"precision": "explicit", "channels_last": "explicit"})
    assert decide(HIDDEN_FLAGS, precision="bf16", channels_last=True).channels_last
    assert decide(V100, precision="bf16").precision == "bf16"
    assert Choice("fp16", True, {}).lightning_precision == "16-mixed"
    assert [LIGHTNING_PRECISION[p] for p in ("fp32", "bf16")] == ["32-true", "bf16-mixed"]


def test_cpu_info_reads_model_name_and_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    name, flags = cpu_info(info)
    assert (name, flags) == ("AMD EPYC 9R14", frozenset({"fpu", "avx512f", "avx512_bf16"}))
    assert auto_precision(Hardware("cpu", name, flags)) == ("bf16", "AVX512-BF16")


def test_training_device_of_the_accelerator() -> None:
    assert training_device("cpu") == "cpu"
    assert training_device("gpu") == training_device("cuda") == "cuda"
    assert training_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_predict_auto_precision_follows_the_same_rule() -> None:
    cpu = torch.device("cpu")
    expected = auto_precision(detect(cpu))[0]
    with autocast(cpu, "auto")():
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    assert dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]


# ---- the probe cache -----------------------------------------------------------------------------------------------
def test_a_cached_probe_is_reused_and_decides_channels_last(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    hw = detect("cpu")
    precision = auto_precision(hw)[0]
    cache.write_text(json.dumps({probe_key(hw, precision, "train"): FAST_CL}))
    timings, source = cached_probe(hw, torch.device("cpu"), precision, "train", cache)
    assert (timings, source) == (FAST_CL, f"cached in {cache}")
    choice, _ = resolve("cpu", "auto", "auto", "train", cache)
    assert choice.channels_last and choice.precision == precision
    assert "probe: 0.5 s per step vs 1 s contiguous" in choice.why["channels_last"]


def test_the_probe_measures_once_and_caches_without_touching_the_seeded_rng(tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "probe.json"
    hw = detect("cpu")
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    net = TINY_NET
    timings, source = cached_probe(hw, torch.device("cpu"), "fp32", "infer", cache, net)
    # a run that probes initialises the same model as one that reads the cache
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    assert source == f"measured now, cached in {cache}"
    assert set(timings) == {"contiguous", "channels_last"} and all(t > 0 for t in timings.values())
    assert json.loads(cache.read_text()) == {probe_key(hw, "fp32", "infer", net.name): timings}
    assert cached_probe(hw, torch.device("cpu"), "fp32", "infer", cache, net) == (timings, f"cached in {cache}")
    # another network is measured on its own; without a network only the cache answers
    assert cached_probe(hw, torch.device("cpu"), "fp32", "infer", cache) == (None, "no network to probe")


def test_the_probe_times_the_runs_own_network_at_its_size() -> None:
    assert TINY_NET.input_shape == (1, 4, 32, 32, 32) and TINY_NET.name.startswith("UNet3D ")
    net = TINY_NET.build(True)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv3d)][0] == 4  # filters [4, 8]
    # a GPU gets the run's batch and patch; a CPU one sample, sides halved towards 32 while multiples of 16
    assert probe_input_shape("cuda", 2, 4, [128, 128, 128]) == (2, 4, 128, 128, 128)
    assert probe_input_shape("cpu", 2, 4, [128, 96, 160]) == (1, 4, 32, 48, 80)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", json.dumps({"k": {"contiguous": 1.0}}), "\xff\xfe",
                                     json.dumps({"k": {"contiguous": "fast", "channels_last": 1.0}})])
def test_a_malformed_probe_cache_is_ignored_with_a_warning_and_rewritten(tmp_path: Path, caplog, monkeypatch,
                                                                          content: str) -> None:
    """A list, bad JSON, an entry missing a key: brats-train / brats-predict used to crash until it was deleted."""
    monkeypatch.setattr(runtime, "probe_channels_last", lambda *args: dict(NO_GAIN))  # no timing here
    cache = tmp_path / "probe.json"
    cache.write_bytes(content.encode("latin-1"))
    hw = detect("cpu")
    good = {probe_key(hw, "fp32", "train"): FAST_CL}
    with caplog.at_level(logging.WARNING, logger="brats_unet.runtime"):
        choice, _ = resolve("cpu", "fp32", "auto", "train", cache, TINY_NET)
    assert f"probe cache {cache}" in caplog.text and "rewritten" in caplog.text
    assert not choice.channels_last and choice.why["channels_last"] == f"probe: 1 s per step vs 1 s contiguous, " \
                                                                       f"measured now, cached in {cache}"
    assert json.loads(cache.read_text()) == {probe_key(hw, "fp32", "train", TINY_NET.name): NO_GAIN}
    # a good entry beside a bad one is kept, and the file cleaned
    cache.write_text(json.dumps({**good, "bad": [1]}))
    assert resolve("cpu", "fp32", "auto", "train", cache)[0].channels_last
    assert json.loads(cache.read_text()) == good


def test_a_rank_of_a_multi_process_run_never_times_it_reads_the_cache(tmp_path: Path, monkeypatch) -> None:
    """Every SLURM rank probing on its own could decide differently (DDP then fails on strides): none of them does."""
    cache = tmp_path / "probe.json"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    choice, _ = resolve("cpu", "fp32", "auto", "train", cache, TINY_NET)
    assert not choice.channels_last and "multi-process" in choice.why["channels_last"] and not cache.exists()
    hw = detect("cpu")
    cache.write_text(json.dumps({probe_key(hw, "fp32", "train", TINY_NET.name): FAST_CL}))
    assert resolve("cpu", "fp32", "auto", "train", cache, TINY_NET)[0].channels_last


def test_the_run_device_is_the_ranks_own(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert run_device("cpu") == torch.device("cpu")
    assert run_device("gpu", 1) == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert run_device("gpu", 2) == torch.device("cuda", 1)
    assert run_device("gpu", [2, 3]) == torch.device("cuda", 3)


def test_cpu_flags_can_be_forced_so_ci_runs_auto_as_bf16(monkeypatch) -> None:
    monkeypatch.setenv("BRATS_UNET_CPU_FLAGS", "avx2 avx512_bf16")
    assert detect("cpu").cpu_flags == {"avx2", "avx512_bf16"} and auto_precision(detect("cpu"))[0] == "bf16"
    with autocast("cpu", "auto")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("BRATS_UNET_CPU_FLAGS", "avx2")
    assert auto_precision(detect("cpu")) == ("fp32", "no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32")


def test_a_bad_channels_last_value_names_the_key() -> None:
    with pytest.raises(BratsError, match=r"runtime\.channels_last must be auto, true or false, got 'fast'"):
        resolve("cpu", "auto", "fast")


# ---- auto in brats-train -------------------------------------------------------------------------------------------
@pytest.mark.slow  # a full train()
def test_train_resolves_auto_logs_it_and_records_what_ran(synthetic_root: Path, cache_dir: Path, tmp_path: Path,
                                                          monkeypatch, caplog) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an empty cache: the run's network is probed
    hw = detect("cpu")
    precision = auto_precision(hw)[0]
    probed = []
    monkeypatch.setattr(runtime, "probe_channels_last", lambda *args: probed.append(args) or dict(FAST_CL))
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, run)
                 if not o.startswith(("trainer.precision", "runtime.channels_last"))]
    cfg = compose_train([*overrides, "logger=none"])
    assert (cfg.trainer.precision, cfg.runtime.channels_last) == ("auto", "auto")
    with caplog.at_level(logging.INFO, logger="brats_unet.training"):
        train(cfg)
    lightning = LIGHTNING_PRECISION[precision]
    assert f"precision auto -> {lightning} ({auto_precision(hw)[1]}), channels_last auto -> True" in caplog.text
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["brats_config"]["trainer"]["precision"] == lightning
    # probed once, on the run's device, with the run's own network (filters 4..16, 4 inputs, 32^3 patch, one sample)
    [(model, device, chosen, use)] = probed
    assert (device, chosen, use, model.input_shape) == (torch.device("cpu"), precision, "train", (1, 4, 32, 32, 32))
    convs = [m for m in model.build(False).modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].out_channels == 4 and max(c.out_channels for c in convs) == 16
    # the checkpoint records the training cases' median voxel size: brats-predict resamples other spacings to it
    train_cases = json.loads((run / "split.json").read_text())["train"]
    zooms = [nib.load(synthetic_root / c / f"{c}_t1.nii.gz").header.get_zooms()[:3] for c in train_cases]
    assert ckpt["brats_spacing"] == pytest.approx(np.median(np.asarray(zooms, dtype=np.float64), axis=0).tolist())
    assert ckpt["brats_config"]["runtime"]["channels_last"] is True


@pytest.mark.slow
def test_interrupted_and_resumed_bf16_run_ends_bit_identical(synthetic_root: Path, cache_dir: Path,
                                                            tmp_path: Path) -> None:
    """bf16 autocast (what auto picks on AVX512-BF16 / AMX CPUs and Ampere+ GPUs) resumes exactly: 1 epoch + resume
    to 2 gives the weights of one 2-epoch run."""
    common = ["trainer.precision=bf16-mixed", "logger=none", "model.dropout=0.3", "augment=modern",
              "scheduler.warmup_steps=1", "scheduler.total_steps=4", "trainer.check_val_every_n_epoch=2"]
    straight, legs = tmp_path / "straight", tmp_path / "legs"
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, straight), *common, "trainer.max_epochs=2"]))
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, legs), *common, "trainer.max_epochs=1"]))
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, legs), *common, "trainer.max_epochs=2",
                         "ckpt_path=last"]))
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for r in (straight, legs))
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (4, 1)
    assert a["brats_config"]["trainer"]["precision"] == "bf16-mixed"
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
