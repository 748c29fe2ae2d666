"""A member's network as ONNX: writing the graph (brats-export format=onnx) and running it with onnxruntime behind the
torch module interface, so the sliding window, TTA, ensembling and decoding around it are the torch path's own.

onnx and onnxruntime are an optional extra (`pip install -e .[export]`); they are imported when first needed and a
missing one is a BratsError that says how to install it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from brats_unet.utils import BratsError, atomic_path

OPSET = 18
INPUT, OUTPUT = "image", "logits"


def optional(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or a BratsError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BratsError(f"{purpose} needs the `{module}` package, which is not installed: pip install -e '.[export]' "
                         f"(or pip install onnx onnxruntime)") from e


def export_onnx(net: nn.Module, path: Path, in_channels: int, patch_size: Sequence[int]) -> None:
    """Trace `net` (eval mode, fp32, contiguous) on one patch and write it to `path` with dynamic batch and spatial
    axes (the U-Net is fully convolutional: any size divisible by its pooling factor runs)."""
    optional("onnx", "format=onnx")
    net = net.eval()
    example = torch.zeros(1, in_channels, *[int(p) for p in patch_size])
    axes = {0: "batch", **{i + 2: f"s{i}" for i in range(len(patch_size))}}
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The U-Net's input checks (channels, divisibility) are Python branches the tracer records as constants: the
        # graph skips them, and the sliding window only feeds it whole patches.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # InstanceNorm always normalises with the input's own statistics; the exporter's "train=True" note is moot.
        warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")
        torch.onnx.export(net, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
                          dynamic_axes={INPUT: axes, OUTPUT: axes}, dynamo=False)


class OnnxNetwork(nn.Module):
    """forward((n, C, *patch) tensor) -> (n, K, *patch) float32 logits from an onnxruntime CPU session."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        ort = optional("onnxruntime", "runtime=onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a damaged graph
            raise BratsError(f"{path}: onnxruntime cannot load this graph ({e})") from e
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        device = x.device
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self.session.run([OUTPUT], {INPUT: array})
        return torch.from_numpy(logits).to(device)
