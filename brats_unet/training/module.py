"""The LightningModule: glue between the U-Net, the loss, the metrics and the optimiser. No maths lives here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from brats_unet.data.labels import LabelSchema
from brats_unet.evaluation.metrics import BratsMetrics, paper_dice
from brats_unet.evaluation.overlays import case_panel, class_colors
from brats_unet.models.sliding_window import sliding_window
from brats_unet.training.checkpoint import restore_rng_states, rng_states
from brats_unet.utils import BratsError

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")


def batch_region_dice(pred: Tensor, target: Tensor, schema: LabelSchema) -> Tensor:
    """Hard Dice of the schema's regions (WT/TC/ET) summed over the batch, averaged over regions: a cheap
    training-time signal. A region absent from both prediction and truth counts as 1 (the BraTS convention).
    """
    scores = []
    for name in schema.region_names:
        classes = torch.tensor(schema.region_classes[name], device=pred.device)
        p, t = torch.isin(pred, classes), torch.isin(target, classes)
        denominator = p.sum() + t.sum()
        # torch.where, not `if denominator > 0`: no host sync per region per training step (it stalls a GPU)
        scores.append(torch.where(denominator > 0, 2 * (p & t).sum() / denominator.clamp_min(1), 1.0))
    return torch.stack(scores).float().mean()


def batch_spacing(batch: dict[str, Any]) -> Tensor | tuple[float, ...]:
    """Voxel spacing of every case in a collated batch, (B, 3); (1, 1, 1) for all when the batch has none.

    Per case, not the first case's for all: HD95 is in mm, so a batch mixing spacings must not share one.
    """
    spacing = batch.get("spacing")
    if spacing is None:
        return (1.0, 1.0, 1.0)
    if isinstance(spacing, Tensor):  # collated from a (3,) array per case -> (B, 3)
        return spacing
    return torch.stack([torch.as_tensor(v).flatten() for v in spacing], dim=1)  # collated from a list: 3 x (B,)


class BratsModule(L.LightningModule):
    """Trains `net` with `loss`; validates on whole volumes with sliding windows and BraTS region metrics.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`): `optimizer(params=...)` and
    `scheduler(optimizer, total_steps=...)`. The scheduler steps every optimiser step, so the LR is a pure function
    of `global_step` and a resumed run follows the same curve.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        patch_size: Sequence[int] = (128, 128, 128),
        val_overlap: float = 0.5,
        val_window_batch: int = 1,
        val_hd95: bool = True,
        log_images_every_n_epochs: int = 5,
        nonfinite_loss: str = "stop",
        compile: bool = False,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"module.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler", "config"], logger=False)
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.patch_size = tuple(int(p) for p in patch_size)
        self.config = config  # the run's resolved Hydra config, stored in every checkpoint for brats-predict
        # Compile a view of the net without registering it as a submodule: state_dict keys stay `net.*`, so a
        # checkpoint loads whether or not the run that wrote it was compiled.
        object.__setattr__(self, "_forward_net", torch.compile(self.net) if compile else self.net)
        # The label schema (classes, regions) is the loss's: the head it trains is the one metrics decode.
        self.val_metrics = BratsMetrics(hd95=val_hd95, schema=loss.schema)
        self.test_metrics = BratsMetrics(hd95=val_hd95, schema=loss.schema)
        self.register_buffer("best_val_dice", torch.tensor(float("-inf")))
        self.register_buffer("skipped_batches", torch.tensor(0))
        # The epoch's mean training loss, reduced over DDP ranks once at epoch end (compute), not all-reduced every
        # step as `self.log(tensor, sync_dist=True, on_step=True)` would; the step value is this rank's.
        self.train_loss = MeanMetric(nan_strategy="disable")  # the loss is finite here: no NaN check (a sync)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        return self._forward_net(x)

    # ---- training ---------------------------------------------------------------------------------------------
    def supervised_loss(self, outputs: Tensor | list[Tensor], target: Tensor) -> Tensor:
        """Loss on the full-resolution output, or the 0.5^i-weighted sum over deep-supervision heads (nnU-Net)."""
        if isinstance(outputs, Tensor):
            return self.loss(outputs, target)
        weights = [0.5**i for i in range(len(outputs))]
        total = 0.0
        for w, logits in zip(weights, outputs, strict=True):
            t = target
            if logits.shape[2:] != target.shape[1:]:
                t = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
            total = total + w * self.loss(logits, t)
        return total / sum(weights)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        image, target = batch["image"], batch["label"].long()  # uint8 from the loader, widened on the device
        skip = self.hparams.nonfinite_loss == "skip"
        # A NaN batch also poisons norm running statistics in the forward pass: keep a copy to put back if skipped.
        saved = [b.detach().clone() for b in self.net.buffers()] if skip else []
        outputs = self(image)
        loss = self.supervised_loss(outputs, target)
        # The one host sync per step left: a non-finite loss must stop or skip the step before the optimiser applies
        # its gradients (and before a periodic checkpoint could save poisoned weights).
        if not torch.isfinite(loss):
            cases = ", ".join(batch.get("case", []))
            if skip:
                with torch.no_grad():
                    for buffer, old in zip(self.net.buffers(), saved, strict=True):
                        buffer.copy_(old)
                self.skipped_batches += 1
                # Returning None makes Lightning skip backward; the optimiser sees no gradients, so no weight moves.
                log.warning("non-finite loss (%s) at step %d (cases %s): batch skipped (%d so far)", loss.item(),
                            self.global_step, cases, int(self.skipped_batches))
                return None
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} on cases [{cases}]; "
                "training stopped and the last checkpoint (checkpoints/last.ckpt) is untouched. "
                "Check these cases, lower optimizer.lr, or set module.nonfinite_loss=skip to skip such batches."
            )
        logits = outputs if isinstance(outputs, Tensor) else outputs[0]
        n = image.shape[0]
        self.train_loss(loss.detach(), n)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        with torch.no_grad():
            dice = batch_region_dice(self.loss.to_classes(logits), target, self.loss.schema)
            self.log("train/dice", dice, prog_bar=True, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            if self.loss.activation == "softmax":
                dice_paper = paper_dice(self.loss.probabilities(logits), target)
                self.log("train/dice_paper", dice_paper, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.skipped_batches > 0:
            self.log("train/skipped_batches", self.skipped_batches.float())

    def on_fit_start(self) -> None:
        if self.hparams.nonfinite_loss == "skip" and self.trainer.world_size > 1:
            # Lightning cannot skip a step on one rank (the others would wait in the gradient all-reduce), and a
            # zero loss would still move Adam's weights: refuse rather than pretend.
            raise BratsError("module.nonfinite_loss=skip works on one device only; with DDP use "
                             "module.nonfinite_loss=stop (the run stops with the last good checkpoint kept)")

    # ---- validation and test: whole volumes, sliding window ---------------------------------------------------
    def predict_logits(self, image: Tensor) -> Tensor:
        return sliding_window(
            image, self, self.patch_size, overlap=self.hparams.val_overlap, window_batch=self.hparams.val_window_batch
        )

    def _evaluate(self, batch: dict[str, Any], stage: str, metrics: BratsMetrics) -> Tensor:
        image, target = batch["image"], batch["label"].long()
        logits = self.predict_logits(image)
        loss = self.loss(logits, target)
        pred = self.loss.to_classes(logits)
        metrics.update(pred, target, spacing=batch_spacing(batch))
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=1, sync_dist=True)
        if self.loss.activation == "softmax":
            dice = paper_dice(self.loss.probabilities(logits), target)
            self.log(f"{stage}/dice_paper", dice, on_epoch=True, batch_size=1, sync_dist=True)
        return pred

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self._evaluate(batch, "val", self.val_metrics)
        every = self.hparams.log_images_every_n_epochs
        if batch_idx == 0 and every and self.current_epoch % every == 0:
            self._log_overlay(batch, pred)

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in results.items():
            self.log(f"val/{name}", value, prog_bar=name == "dice_mean", sync_dist=True)  # already synced: no warning
        if not self.trainer.sanity_checking:
            # In place: a new tensor made here under Lightning's inference_mode (CUDA validation) would be an
            # inference tensor, and DDP's buffer broadcast at the next training step refuses those.
            self.best_val_dice.copy_(torch.maximum(self.best_val_dice, results["dice_mean"].to(self.best_val_dice)))
            self.log("val/dice_mean_best", self.best_val_dice, sync_dist=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        for name, value in self.test_metrics.compute().items():
            self.log(f"test/{name}", value)
        self.test_metrics.reset()

    def _log_overlay(self, batch: dict[str, Any], pred: Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        image = batch["image"][0].float().cpu().numpy()
        panel = case_panel(image, batch["label"][0].cpu().numpy(), pred[0].cpu().numpy(),
                           colors=class_colors(self.loss.schema))
        case = batch.get("case", ["case"])[0]
        experiment.add_image(f"val/overlay/{case}", panel, self.global_step, dataformats="HWC")

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # scheduler.total_steps in the config pins the schedule length (e.g. a run planned in two legs); by default
        # it spans the whole fit.
        total_steps = getattr(self.scheduler_factory, "keywords", {}).get("total_steps")
        total_steps = total_steps or int(self.trainer.estimated_stepping_batches)
        try:
            scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        except ValueError as e:  # e.g. warm-up longer than the whole fit: a config problem, not a crash
            raise BratsError(f"{e} (this fit has {total_steps} optimizer steps)") from e
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["brats_config"] = self.config
        # The training cases' voxel size: brats-predict resamples a case at another spacing to it.
        datamodule = getattr(self._trainer, "datamodule", None)
        spacing = datamodule.training_spacing() if hasattr(datamodule, "training_spacing") else None
        if spacing is not None:
            checkpoint["brats_spacing"] = spacing
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("rng_states"):
            restore_rng_states(checkpoint["rng_states"])
