"""Each benchmark's main at its tiniest setting: it runs, writes JSON with the machine info, and its numbers are
positive. No timing thresholds: speed depends on the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# benchmarks/ sits beside the package, not inside it: make the checkout importable when pytest is run from elsewhere.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import (  # noqa: E402
    cv_ensemble,
    data_loading,
    demo,
    evaluation,
    gpu_check,
    inference,
    realism,
    run_all,
    time_to_quality,
    training,
)
from benchmarks.common import format_table, threads  # noqa: E402
from brats_unet.runtime import auto_precision, cache_file, detect, probe_key  # noqa: E402

# One thread: on a small shared VM, tiny ops with 2 threads can be 100x slower (thread wake-ups dominate).
FAST = ["--threads", "1"]
MACHINE_KEYS = {"cpu", "cores", "torch", "threads", "device", "device_name", "timestamp"}


def _load(path: Path, name: str) -> dict:
    result = json.loads(path.read_text())
    assert result["benchmark"] == name
    assert set(result["machine"]) >= MACHINE_KEYS
    assert result["machine"]["cores"] > 0 and result["machine"]["threads"] == 1  # --threads 1 was in effect
    return result


def test_training_benchmark_tiny(tmp_path: Path) -> None:
    training.main(["--device", "cpu", "--models", "tiny", "--patches", "16", "--batches", "1,2", "--steps", "1",
                   "--warmup", "1", "--precisions", "fp32,bf16", "--option-at", "tiny:16:1", "--reference-at",
                   "tiny:16:1", "--channels-last", "on", "--compile", "off", "--memory-probe", "",
                   "--thread-options", "", *FAST, "--out", str(tmp_path)])
    result = _load(tmp_path / "training-cpu.json", "training")
    rows = result["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    # sizes (batch 1, 2) + options (bf16, channels_last, channels_last+bf16) + reference (no norm); the fp32
    # instance-norm reference row is the batch-1 size row, run once
    assert len(ours) == 6
    for r in ours:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["gflop_fwd"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["threads_used"] == 1
    by_batch = {r["batch"]: r["gflop_fwd"] for r in ours if r["section"] == "size"}
    assert by_batch[2] == pytest.approx(2 * by_batch[1], rel=0.01)  # FLOPs scale with the batch
    monai = [r for r in rows if r["impl"] == "monai"]
    assert len(monai) == 1 and len(result["reference"]) == 1
    if monai[0]["status"] == "ok":
        assert result["reference"][0]["ratio_ours_over_monai"] > 0
    else:
        assert monai[0]["status"].startswith("monai not installed")


def test_training_benchmark_skips_combinations_over_budget(tmp_path: Path) -> None:
    training.main(["--device", "cpu", "--models", "tiny", "--patches", "16,32", "--batches", "1", "--steps", "1",
                   "--warmup", "0", "--precisions", "fp32", "--option-at", "", "--reference-at", "",
                   "--memory-probe", "", "--thread-options", "", "--max-combo-seconds", "0", *FAST,
                   "--out", str(tmp_path)])
    rows = _load(tmp_path / "training-cpu.json", "training")["rows"]
    assert [r["patch"] for r in rows] == [16, 32]
    assert rows[0]["status"] == "ok"  # nothing measured yet to estimate from: the cheapest always runs
    assert rows[1]["status"].startswith("skipped: ~") and "--max-combo-seconds 0" in rows[1]["status"]
    assert rows[1]["est_step_s"] > 0


def test_data_loading_benchmark_tiny(tmp_path: Path) -> None:
    data_loading.main(["--cases", "2", "--shape", "32,32,24", "--samples", "2", "--cached-samples", "3", "--model",
                       "tiny", "--patch", "16", "--batch", "1", "--num-workers", "0", "--steps", "2", "--augment",
                       "modern", "--loader-samples", "3", *FAST, "--out", str(tmp_path)])
    result = _load(tmp_path / "data_loading-cpu.json", "data_loading")
    sample, loader = result["per_sample"], result["loader"]
    assert sample["crop_box"] == [[0, 32], [0, 32], [0, 24]]  # the seed's 128^3 box shrunk to the tiny volume
    for key in ("raw_s", "cached_open_each_s", "cached_open_once_s", "ratio_raw_over_cached",
                "ratio_raw_over_cached_open_once"):
        assert sample[key] > 0, key
    assert loader["steps"] == 2 and loader["step_s_mean"] > 0 and 0 < loader["wait_pct"] < 100
    assert loader["augment"] == "modern" and loader["sample_s"] > 0 and loader["workers_needed_at"]["1s"] >= 1


def test_inference_benchmark_tiny(tmp_path: Path, monkeypatch) -> None:
    hw = detect("cpu")  # a pre-filled probe cache: `auto` decides without timing anything here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache_file().parent.mkdir(parents=True)
    precision = auto_precision(hw)[0]
    cache_file().write_text(json.dumps({probe_key(hw, precision, "infer"): {"contiguous": 1.0, "channels_last": 0.5}}))
    inference.main(["--device", "cpu", "--model", "tiny", "--shape", "24,24,20", "--patches", "16", *FAST,
                    "--out", str(tmp_path)])
    rows = _load(tmp_path / "inference-cpu.json", "inference")["rows"]
    assert [(r["setting"], r["precision"], r["channels_last"], r["tta"], r["status"]) for r in rows] == [
        ("auto", precision, True, False, "ok"), ("auto", precision, True, True, "ok"),
        ("fp32", "fp32", False, False, "ok"), ("fp32", "fp32", False, True, "ok")]
    # 2 x 2 x 2 windows of 16 with overlap 0.5 (24 = 16 + 8; 20 -> starts 0, 4); TTA runs them for 8 flips
    assert [r["windows"] for r in rows] == [8, 64, 8, 64]
    assert all(r["s_per_case"] > 0 for r in rows)


def test_inference_benchmark_skips_tta_over_budget(tmp_path: Path) -> None:
    inference.main(["--device", "cpu", "--model", "tiny", "--shape", "16,16,16", "--patches", "16",
                    "--precisions", "fp32", "--max-case-seconds", "0", *FAST, "--out", str(tmp_path)])
    rows = _load(tmp_path / "inference-cpu.json", "inference")["rows"]
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("skipped: ~")


def test_evaluation_benchmark_tiny(tmp_path: Path) -> None:
    evaluation.main(["--challenges", "brats_men_rt", "--cases", "1", "--shape", "40,40,32", "--no-official", *FAST,
                     "--out", str(tmp_path)])
    result = _load(tmp_path / "evaluation-cpu.json", "evaluation")
    (row,) = result["rows"]
    assert (row["challenge"], row["regions"], row["status"]) == ("brats_men_rt", 1, "official not installed")
    assert row["ours_cpu_s"] > 0 and row["official_cpu_s"] is None


@pytest.mark.slow
def test_realism_benchmark_quick(tmp_path: Path) -> None:
    """Without a model: generator numbers, the real template's anatomy and levels, and the figure."""
    realism.main(["--quick", "--full-shape", "64,64,48", "--out", str(tmp_path), "--figures", str(tmp_path / "fig")])
    result = _load(tmp_path / "realism-cpu.json", "realism")
    gen, template = result["generator"], result["template"]
    assert gen["full_cases"] == 1 and gen["demo_case_s"] > 0 and gen["full_case_cpu_s"] > 0
    assert sum(gen["class_share_pct"].values()) == pytest.approx(100, abs=0.01)
    assert 1100 < template["brain_ml"] < 1700  # the template at the generator's mean size
    levels = template["real_t1_vs_wm"]  # real T1: CSF darker than GM darker than WM
    assert levels["csf"] < levels["gm"] < levels["wm"] == 1.0
    assert result["real_anatomy"] == [] and (tmp_path / "fig" / "realism.png").stat().st_size > 10_000


def test_run_all_rejects_unknown_benchmarks(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "training,nope"])
    assert "unknown benchmarks ['nope']" in capsys.readouterr().err


def test_format_table_aligns_columns_and_marks_missing_values() -> None:
    table = format_table([{"a": 1.23456, "b": "x"}, {"a": 12345.6}], ["a", "b"], title="t")
    assert table.splitlines() == ["t", "a      b", "-----  -", "1.23   x", "12346  -"]


@pytest.mark.slow
@pytest.mark.slow  # two arms, each trained, validated and tested
def test_time_to_quality_benchmark_tiny(tmp_path: Path) -> None:
    result = time_to_quality.main(["--quick", "--budget", "1", "--arms", "fp32,resenc", "--cases", "4",
                                   "--val-every", "1", *FAST, "--out", str(tmp_path)])
    rows = _load(tmp_path / "time_to_quality-cpu.json", "time_to_quality")["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    row, resenc = rows
    assert (row["arm"], row["precision"], row["channels_last"], row["status"]) == ("fp32", "32-true", False, "ok")
    assert (resenc["arm"], resenc["impl"], resenc["status"]) == ("resenc", "ours (model=resenc)", "ok")
    for r in rows:
        assert r["steps"] >= 1 and 0 <= r["val_dice_mean"] <= 1 and 0 <= r["test_dice_mean"] <= 1
        assert r["test_cases"] >= 1 and r["load_average_1m"] >= 0 and "time_to_val_dice_0.90_s" in r
        assert all(t <= r["train_s"] + 1 for _, t, _ in r["val_curve"])


def test_cv_ensemble_reads_evaluate_summaries_into_the_readme_table(tmp_path: Path) -> None:
    # The whole benchmark trains three quickstart models (minutes): here only its reading and formatting.
    stats = {"dice_wt": 0.9, "dice_tc": 0.6, "dice_et": 0.3, "hd95_wt": 2.0, "hd95_tc": 4.0, "hd95_et": None}
    summary = {"n_cases": 4, "metrics": {k: {"mean": v} for k, v in stats.items()}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    row = {"model": "ensemble of 3", **cv_ensemble.scores(tmp_path / "summary.json")}
    assert row["dice_mean"] == pytest.approx(0.6) and row["cases"] == 4
    assert cv_ensemble.markdown([row]).splitlines()[2] == (
        "| ensemble of 3 | 4 | 0.900 | 0.600 | 0.300 | 0.600 | 2.0 | 4.0 | - |")


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check: no CUDA device visible to torch" in proc.stdout and "nothing to check" in proc.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # every part of the GPU check at toy sizes on the CPU, about 30 s
def test_gpu_check_dry_run_runs_every_measuring_part_on_the_cpu(tmp_path: Path) -> None:
    with threads(2):  # full-width networks at 64^3: not the tiny tensors conftest's one thread is for
        results = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert results is not None and results["dry_run"] is True
    assert {results[p]["status"] for p in ("throughput", "inference", "loader")} == {"ok"}
    rows = results["throughput"]["rows"]
    assert [(r["model"], r["cudnn"], r["patch"], r["batch"]) for r in rows] == [
        ("paper", "benchmark", 64, 1), ("paper", "deterministic", 64, 1),
        ("resenc", "benchmark", 64, 1), ("resenc", "deterministic", 64, 1)]
    assert all(r["samples_per_s"] > 0 and r["vs_nvidia_published"] == r["samples_per_s"] / 27.48 for r in rows)
    assert [(r["model"], r["tta"], r["window_batch"]) for r in results["inference"]["rows"]] == [
        ("paper", False, 1), ("paper", False, 4), ("paper", True, 4),
        ("resenc", False, 1), ("resenc", False, 4), ("resenc", True, 4)]
    assert results["inference"]["volume"] == [4, 64, 64, 64]
    loader = results["loader"]
    assert loader["resenc_step_s"] == rows[2]["step_s"] and loader["workers_needed"] >= 1
    written = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert written["dry_run"] is True and written["settings"]["dry_run"] is True
    assert (written["settings"]["steps"], written["settings"]["warmup"]) == (1, 0)  # what it ran, not the defaults
    assert written["throughput"]["rows"] == json.loads(json.dumps(rows))  # what was measured is what was written
    table = gpu_check.markdown(written)
    assert "| training | resenc 64^3 b1 fp32 channels_last, cudnn deterministic |" in table
    assert "| inference | resenc 64x64x64, TTA x8, 4 windows per pass |" in table
    assert "| loader | 64^3 sample, augment=modern" in table


def test_gpu_check_markdown_table_from_results() -> None:
    results = {"gpu": "NVIDIA H100", "gpu_tests": {"status": "ok", "summary": "3 passed", "seconds": 20.0},
               "throughput": {"status": "ok", "rows": [
                   {"model": "resenc", "cudnn": "benchmark", "compile": False, "precision": "bf16",
                    "samples_per_s": 13.74, "vs_nvidia_published": 0.5, "nvidia_flops_scaled_img_s": 40.0},
                   {"model": "paper", "cudnn": "deterministic", "compile": True, "precision": "bf16",
                    "status": "error: OutOfMemoryError: ..."}]},
               "inference": {"status": "ok", "rows": [{"model": "resenc", "tta": True, "case_s": 4.25}]}}
    table = gpu_check.markdown(results).splitlines()
    assert table[0].startswith("GPU check on NVIDIA H100") and table[2] == "| part | setting | result |"
    assert "| gpu_tests | | ok 3 passed (20.0 s) |" in table
    assert ("| training | resenc 128^3 b2 bf16 channels_last, cudnn benchmark | 13.74 img/s (0.50 x NVIDIA's 27.48; "
            "FLOP-scaled target 40.0) |") in table
    assert ("| training | paper 128^3 b2 bf16 channels_last, cudnn deterministic, compiled | "
            "error: OutOfMemoryError: ... |") in table
    assert "| inference | resenc 240x240x155, TTA x8, 4 windows per pass | 4.25 s/case |" in table


def test_demo_benchmark_times_exactly_the_makefiles_demo_commands(tmp_path: Path) -> None:
    """benchmarks.demo runs what `make demo` runs (read with make -n, not a copy that could drift), with the venv's
    commands made absolute so they run from a scratch folder; the install step and the closing echo are not timed."""
    venv = tmp_path / "venv" / "bin"
    commands = demo.demo_commands(venv)
    assert [demo.step_name(c) for c in commands] == ["brats-synth", "brats-preprocess", "brats-train",
                                                     "brats-postprocess", "brats-predict", "brats-evaluate",
                                                     "brats-report"]
    assert all(c.startswith(f"{venv}/brats-") for c in commands)
    assert "--distractors --healthy-fraction 0.2" in commands[0] and "\\" not in "".join(commands)
    assert f"hydra.run.dir={demo.RUN}/train" in commands[2] and f"ckpt_path={demo.RUN}/train " in commands[4]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "left").write_text("x")
    with pytest.raises(SystemExit, match=r"--keep .*work: not empty; the demo is timed from nothing"):
        demo.main(["--keep", str(tmp_path / "work")])
