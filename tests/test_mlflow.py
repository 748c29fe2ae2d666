"""logger=mlflow: the same scalars and hyper-parameters as TensorBoard in a file store under the run dir, and the
best checkpoint as an artefact; a clear error when mlflow is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import compose_train, tiny_overrides

from brats_unet.training import build
from brats_unet.training.fit import train
from brats_unet.utils import BratsError


def test_missing_mlflow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_train([*tiny_overrides(tmp_path / "data", tmp_path / "cache", tmp_path / "run"), "logger=mlflow"])
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'run'}/mlflow.db"
    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name))
    with pytest.raises(BratsError, match=r"logger mlflow .* needs the `mlflow` package.*pip install -e '.\[mlflow\]'"):
        build.build_trainer(cfg)


NO_MLFLOW = importlib.util.find_spec("mlflow") is None


@pytest.mark.slow
@pytest.mark.skipif(NO_MLFLOW, reason="mlflow not installed (pip install -e '.[mlflow]')")
def test_mlflow_logs_scalars_hparams_and_the_best_checkpoint(synthetic_root: Path, cache_dir: Path,
                                                             tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, run_dir), "logger=mlflow"])
    metrics = train(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "brats-unet"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["val/dice_mean"] == pytest.approx(metrics["val/dice_mean"])
    assert "train/loss_step" in run.data.metrics or "train/loss" in run.data.metrics
    assert run.data.params["loss._target_"] == cfg.loss._target_ and run.data.params["seed"] == str(cfg.seed)

    def files(path: str = "") -> list[str]:
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += files(item.path) if item.is_dir else [item.path]
        return out

    assert any(p.endswith("best.ckpt") for p in files()), files()
