"""`auto` precision and memory format (brats_unet.runtime): the decision fed explicit capabilities and timings, the
probe cache, and auto end to end in brats-train; a resumed bf16 run stays bit-exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_overrides

from brats_unet.inference.segmenter import autocast_for
from brats_unet.runtime import (
    LIGHTNING_PRECISION,
    Choice,
    Hardware,
    auto_precision,
    cached_probe,
    channels_last_wins,
    cpu_info,
    decide,
    detect,
    probe_key,
    resolve,
    training_device,
)
from brats_unet.training.fit import train
from brats_unet.utils import BratsError

ZEN4 = Hardware("cpu", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = Hardware("cpu", "Xeon", frozenset({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}))
HIDDEN_FLAGS = Hardware("cpu", "Xeon under KVM", frozenset({"avx2", "avx512f", "avx512_vnni"}))
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100", cuda_bf16=False)
FAST_CL = {"contiguous": 1.0, "channels_last": 0.5}


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
    with autocast_for(cpu, "auto")():
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
    timings, source = cached_probe(hw, torch.device("cpu"), "fp32", "infer", cache)
    # a run that probes initialises the same model as one that reads the cache
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    assert source == f"measured now, cached in {cache}"
    assert set(timings) == {"contiguous", "channels_last"} and all(t > 0 for t in timings.values())
    assert json.loads(cache.read_text()) == {probe_key(hw, "fp32", "infer"): timings}
    assert cached_probe(hw, torch.device("cpu"), "fp32", "infer", cache) == (timings, f"cached in {cache}")


def test_a_bad_channels_last_value_names_the_key() -> None:
    with pytest.raises(BratsError, match=r"runtime\.channels_last must be auto, true or false, got 'fast'"):
        resolve("cpu", "auto", "fast")


# ---- auto in brats-train -------------------------------------------------------------------------------------------
@pytest.mark.slow  # a full train()
def test_train_resolves_auto_logs_it_and_records_what_ran(synthetic_root: Path, cache_dir: Path, tmp_path: Path,
                                                          monkeypatch, caplog) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # a pre-filled probe: no timing in a test
    hw = detect("cpu")
    precision = auto_precision(hw)[0]
    probe = tmp_path / "xdg" / "brats-unet" / "hardware-probe.json"
    probe.parent.mkdir(parents=True)
    probe.write_text(json.dumps({probe_key(hw, precision, "train"): FAST_CL}))
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
