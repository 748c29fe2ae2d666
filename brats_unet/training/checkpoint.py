"""Checkpoints: safe loading, resume resolution (`ckpt_path=last`), weight-fit checks, RNG state (Lightning writes
them, atomically through build.AtomicCheckpointIO; nothing here imports Lightning, so inference reads them without it).

Checkpoints travel between groups (model zoos, shared lab disks), so they are read with torch's safe unpickler
(`weights_only=True`): tensors, numbers, strings and containers only. A file that needs anything else is refused
before any of it runs. Our own checkpoints hold nothing else: the run config is a plain dict, RNG states are lists.
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet.training")

# Keys that legitimately differ between an interrupted run and its resumption.
RESUME_IGNORED_KEYS = ("ckpt_path", "overwrite", "paths.output_dir", "hydra")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# Modules that moved when the package was regrouped into a folder per stage: a stored config names the old path.
RENAMED_MODULES = {
    "brats_unet.losses": "brats_unet.training.losses",
    "brats_unet.schedulers": "brats_unet.training.schedulers",
    "brats_unet.checkpoint": "brats_unet.training.checkpoint",
    "brats_unet.module": "brats_unet.training.module",
}


def renamed_target(target: str) -> str:
    """A `_target_` written before the regrouping, in its current module path (others unchanged)."""
    module, _, name = target.rpartition(".")
    return f"{RENAMED_MODULES[module]}.{name}" if module in RENAMED_MODULES else target


def _rename_targets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: renamed_target(v) if k == "_target_" and isinstance(v, str) else _rename_targets(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rename_targets(v) for v in node]
    return node


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run config in the current keys: speed knobs once under model/module now live in `runtime`; `_target_`s
    of modules that moved name their new place."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in _rename_targets(config).items()}
    runtime = config.setdefault("runtime", {})
    for group, key in (("model", "channels_last"), ("model", "compile"), ("module", "channels_last")):
        if key in (config.get(group) or {}):
            value = config[group].pop(key)
            runtime[key] = bool(runtime.get(key)) or bool(value)
    return config


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint read with the safe unpickler; BratsError naming the file if it is unsafe, damaged or foreign."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BratsError(f"checkpoint {path} does not exist (config key ckpt_path)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            # The payload of a crafted file (a __reduce__ to os.system, ...) is one of these: refuse, never run it.
            first = str(e).split("\n\n")[1] if "\n\n" in str(e) else str(e)
            raise BratsError(f"checkpoint {path} holds objects other than tensors, numbers, strings and containers, "
                             f"so it was not unpickled (a checkpoint can run code when loaded; brats-unet checkpoints "
                             f"never need that): {' '.join(first.split())[:300]}") from None
        raise BratsError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is it truncated?") from e
    except Exception as e:  # torch raises RuntimeError, EOFError... for a damaged file
        raise BratsError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is it truncated?") from e
    if not isinstance(checkpoint, dict):
        raise BratsError(f"checkpoint {path} is not a brats-unet checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def resume_candidates(output_dir: Path) -> list[Path]:
    """last.ckpt (end of each epoch) and the periodic step checkpoints of a run dir, newest first."""
    folder = output_dir / "checkpoints"
    periodic = [p for p in (folder / "periodic").glob("*.ckpt") if not p.name.startswith(".")]  # not temp files
    found = [p for p in (folder / "last.ckpt", *periodic) if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def newest_sibling_run(output_dir: Path) -> Path | None:
    """The most recently written run dir beside `output_dir` (same task's runs/ folder) that holds a last.ckpt."""
    parent = output_dir.parent
    if not parent.is_dir():
        return None
    runs = [p for p in parent.iterdir() if p != output_dir and (p / "checkpoints" / "last.ckpt").is_file()]
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime_ns, default=None)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(path, loaded checkpoint) to resume from, or (None, None) for a fresh run.

    `last` -> the newest readable checkpoint of the run dir (last.ckpt, or a newer periodic one from inside a long
    epoch); a damaged newest file (a kill during torch.save) falls back to the one before it. A path must exist.
    """
    if ckpt_path is None:
        return None, None
    if str(ckpt_path) != "last":
        if not Path(ckpt_path).is_file():
            raise BratsError(f"ckpt_path {ckpt_path} does not exist (pass ckpt_path=last to resume this run dir)")
        return str(ckpt_path), load_checkpoint(ckpt_path)
    candidates = resume_candidates(output_dir)
    if not candidates:
        sibling = newest_sibling_run(output_dir)
        hint = (f" The newest run of this task with a checkpoint is {sibling}: to resume it, run the same command "
                f"with hydra.run.dir={sibling} ckpt_path=last") if sibling else ""
        log.warning("ckpt_path=last but %s holds no checkpoint yet: starting a FRESH run.%s",
                    output_dir / "checkpoints", hint)
        return None, None
    first_error = None
    for path in candidates:
        try:
            return str(path), load_checkpoint(path)
        except BratsError as e:
            if "was not unpickled" in str(e):
                raise  # an unsafe file is never skipped silently
            log.warning("skipping %s", e)
            first_error = first_error or e
    raise BratsError(f"ckpt_path=last: no checkpoint in {output_dir / 'checkpoints'} can be read: {first_error}")


def warn_config_changes(checkpoint: dict[str, Any], current: dict[str, Any], path: str) -> list[str]:
    """Log which config keys differ between the checkpoint's run and this one; return them."""
    saved = checkpoint.get("brats_config")
    if not saved:
        return []
    old, new = flatten(upgrade_config(saved)), flatten(current)
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUME_IGNORED_KEYS)
    )
    for key in changed:
        log.warning("resuming %s with a changed config: %s: %r -> %r", path, key, old.get(key), new.get(key))
    return changed


def weight_mismatches(state: dict[str, Any], module: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """(state with compiled-net `_orig_mod.` prefixes removed, list of keys/shapes that do not fit `module`)."""
    state = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
    own = module.state_dict()
    problems = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    return state, problems


def check_weights_fit(checkpoint: dict[str, Any], module: nn.Module, path: str, changed: list[str]) -> None:
    """BratsError when a checkpoint's weights do not fit the module this config builds (a different model config)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise BratsError(f"checkpoint {path} has no 'state_dict': it was not written by brats-train")
    _, problems = weight_mismatches(state, module)
    if problems:
        keys = [k for k in changed if k.startswith(("model.", "loss.", "preprocess.", "data."))]
        hint = f" (changed config keys: {', '.join(keys)})" if keys else ""
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BratsError(f"checkpoint {path} was written by a different model config{hint}; its weights do not fit "
                         f"this model: {'; '.join(problems[:3])}{more}. Resume with the run's own config, or start a "
                         "new run dir")


def rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and plain lists (what the safe unpickler reads back).

    Lightning does not keep them; dropout and global numpy/python draws need them for a resumed run to end
    bit-identical to an uninterrupted one.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the states rank 0 saved, on every rank. Under DDP that is each rank's own state too: seed_everything
    gives every rank the same seed and every rank draws the same sequence (same ops, same shapes)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
