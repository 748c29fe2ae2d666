"""`brats-synth`: write synthetic BraTS-like cases (real NIfTI files in a BraTS layout) for demos and tests."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from brats_unet.cli.common import user_errors
from brats_unet.synth.generator import FULL_SHAPE, write_dataset
from brats_unet.synth.releases import RELEASE_ALIASES, RELEASES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brats-synth",
        description="Write synthetic BraTS-like cases (4 MRI sequences + label map per case). Re-running the same "
        "command skips finished cases.",
    )
    p.add_argument("--out", default="data/synthetic", help="output folder (default: %(default)s)")
    p.add_argument("--cases", type=int, default=20, help="number of cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; case i is the same for any --cases")
    p.add_argument("--layout", choices=sorted([*RELEASES, *RELEASE_ALIASES]), default="2021",
                   help="release: file naming and labels of a BraTS (sub-)challenge (2021: ET 4; 2023: ET 3; see the "
                   "README's dataset table); default %(default)s")
    p.add_argument("--shape", type=int, nargs=3, default=list(FULL_SHAPE), metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default: 240 240 155, BraTS size)")
    p.add_argument("--distractors", action="store_true",
                   help="add bright healthy structures labelled background: choroid plexus, veins and sinuses "
                   "(T1ce), periventricular caps and white-matter hyperintensities (FLAIR/T2); off by default")
    p.add_argument("--healthy-fraction", type=float, default=0.0, metavar="F",
                   help="share of heads without a tumour, in [0, 1] (default: %(default)s)")
    p.add_argument("--nonenhancing-share", type=float, default=None, metavar="S",
                   help="share of gliomas without enhancing tumour (core labelled NCR, no ET), in [0, 1] "
                   "(default: 0.08; the others keep their ratio)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in the case folders")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel processes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress line per case")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        start = time.perf_counter()
        folders = write_dataset(args.out, args.cases, args.seed, layout=args.layout,
                                shape=args.shape, overwrite=args.overwrite, progress=not args.quiet,
                                workers=args.workers, distractors=args.distractors,
                                healthy_fraction=args.healthy_fraction, nonenhancing=args.nonenhancing_share)
        root = Path(args.out).resolve()
        print(f"{len(folders)} synthetic cases in {root} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
