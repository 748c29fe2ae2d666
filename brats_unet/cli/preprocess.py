"""brats-preprocess: validate a BraTS root and build the preprocessed cache.

    brats-preprocess data=brats2021 data.root=/data/BraTS2021 preprocess=modern [check_only=true]
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.data.cache import build_cache, cached_cases
from brats_unet.data.discovery import list_case_dirs


def preprocess(cfg: DictConfig) -> Path:
    """Build (or with check_only, just validate) the cache for cfg.data + cfg.preprocess; return its folder."""
    data = cfg.data
    out = build_cache(root=data.root, layout=data.layout, cache_dir=data.cache_dir, preprocess=cfg.preprocess,
                      num_workers=int(cfg.num_workers), skip_bad_cases=bool(data.skip_bad_cases),
                      check_only=bool(cfg.check_only), schema=data.get("schema"))
    if cfg.check_only:
        n = len(list_case_dirs(data.root, data.layout))
        note = "bad cases, if any, are logged above" if data.skip_bad_cases else "all valid"
        print(f"checked {n} cases in {data.root}: {note} (nothing written; the cache would be {out})")
    else:
        print(f"cache: {out}\ncases: {len(cached_cases(out))}")
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        preprocess(cfg)


if __name__ == "__main__":
    main()
