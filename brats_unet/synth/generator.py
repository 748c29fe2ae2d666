"""Synthetic BraTS-like cases: a real-anatomy head with a glioma, four MRI sequences and a BraTS label map.

Real BraTS cannot be downloaded here, so demos and tests use these stand-ins. A case is generated in three steps:
anatomy (anatomy.py: the MNI152 template's tissue maps, posed and warped per case), lesions (tumour.py: placed by
anatomy, with mass effect) and appearance (appearance.py: a randomised scanner per case), plus, on request, bright
healthy structures that are not tumour (distractors.py). The head is laid out in millimetres of the 240x240x155 BraTS
field of view and sampled at the requested shape, so a small shape is the same head at coarser resolution. Generation
returns canonical modalities and internal classes (`SynthCase`); the writing step below names and labels the files as
a release does (releases.py), so a new BraTS release is a small change there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_unet.data.labels import MODALITIES, LabelSchema, resolve_schema
from brats_unet.synth.anatomy import FULL_MM, FULL_SHAPE, Pose, grid_axes, load_atlas, sample_tissue, tissue_for_spacing
from brats_unet.synth.appearance import draw_distractor_contrast, render
from brats_unet.synth.distractors import draw_distractors
from brats_unet.synth.releases import (
    MSD_DATASET,
    RELEASE_ALIASES,
    Release,
    case_folder,
    case_name,
    layout_files,
    resolve_release,
)
from brats_unet.synth.tumour import (
    BG,
    TISSUE_CLASS,
    TISSUES,
    draw_lesions,
    draw_metastases,
    kinds_with,
    paint_lesions,
)
from brats_unet.utils import BratsError, atomic_path, atomic_write_json

__all__ = ["FULL_SHAPE", "TISSUES", "Options", "SynthCase", "brats_affine", "case_options", "case_rng", "generate_case",
           "physical_spacing", "schema_seg", "write_dataset"]
GOLDEN = (5 ** 0.5 - 1) / 2  # healthy heads: case i is one when frac((i + 1) * GOLDEN) < --healthy-fraction
CYSTS = 0.5  # share of paediatric tumours (--layout ped) with a cyst (label CC)
COARSE_MM = 6.0  # grid on which lesions are placed (anatomy is smooth at that scale)


def brats_affine(shape: Sequence[int] = FULL_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """BraTS-like voxel-to-world affine: diag(-1, -1, 1) * spacing with the y origin at the far edge (as in BraTS)."""
    affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    affine[1, 3] = (shape[1] - 1) * float(spacing[1])
    return affine


def physical_spacing(shape: Sequence[int]) -> list[float]:
    """Voxel size (mm) at which `shape` covers the 240 x 240 x 155 mm BraTS field of view."""
    return [full / n for full, n in zip(FULL_SHAPE, shape, strict=True)]


@dataclass
class SynthCase:
    """One generated case before any file layout: what a layout writer needs to name and label it."""

    images: dict[str, np.ndarray]  # int16 per canonical modality (MODALITIES order)
    classes: np.ndarray  # uint8 internal classes: 0 background, 1 NCR (incl. non-enhancing), 2 ED, 3 ET
    tissue: np.ndarray  # uint8, values index TISSUES (healthy tissue by majority, lesion tissues, cavity)
    healthy: np.ndarray  # uint8, the majority healthy tissue (WM, GM, CSF) each voxel had before the lesions
    affine: np.ndarray
    distractors: np.ndarray | None = None  # uint8 distractors.DISTRACTORS codes (labelled background), if drawn


def generate_case(rng: np.random.Generator, shape: Sequence[int] = FULL_SHAPE,
                  spacing: Sequence[float] | None = None, cavity: bool = False, *, tumour: bool = True,
                  metastases: bool = False, distractors: np.random.Generator | None = None,
                  nonenhancing: float | None = None) -> SynthCase:
    """One synthetic case on a `shape` grid covering the BraTS field of view (a small shape is the same head at a
    coarser resolution). `spacing` only sets the affine's voxel size (default: the physical one, 240 / shape[0]
    mm ...). `cavity` adds a resection cavity (tissue "cavity", class 0) at the main tumour's centre (a paediatric
    cyst where the release labels one). `tumour=False`: a healthy head; `metastases`: several mostly small lesions
    instead of a glioma; `distractors`: the random stream of bright healthy structures to add (None: none);
    `nonenhancing`: the share of gliomas without enhancing tumour (None: tumour.KINDS's)."""
    shape = tuple(int(n) for n in shape)
    mm = tuple(float(v) for v in FULL_MM / np.array(shape))
    tissue_for_spacing(tuple(round(v, 3) for v in mm))  # the pre-blurred atlas for this resolution (cached)
    pose = Pose.draw(rng)
    coarse = grid_axes([int(np.ceil(f / COARSE_MM)) for f in FULL_MM])
    cprobs, ccoords = sample_tissue(pose, coarse, mm)
    atlas = load_atlas()
    if not tumour:
        lesions = []
    elif metastases:
        lesions = draw_metastases(rng, coarse, cprobs, cavity)
    else:
        lesions = draw_lesions(rng, coarse, cprobs, ccoords[2] > atlas.centre[2] + atlas.brain_z_mm, cavity,
                               kinds_with(nonenhancing))
    # Work in the brain's bounding box (plus a margin for the warp and mass effect): most of the grid is empty.
    inside = np.argwhere(cprobs.sum(0) > 0.02)
    lo_mm = np.array([coarse[i][j] for i, j in enumerate(inside.min(0))]) - COARSE_MM - 6
    hi_mm = np.array([coarse[i][j] for i, j in enumerate(inside.max(0))]) + COARSE_MM + 6
    step = FULL_MM / np.array(shape)
    box = tuple(slice(max(int(np.floor(a / s)), 0), min(int(np.ceil(b / s)) + 1, n))
                for a, b, s, n in zip(lo_mm, hi_mm, step, shape, strict=True))
    axes = grid_axes(shape, box)
    probs, _ = sample_tissue(pose, axes, mm, [les.push for les in lesions])
    lesion_map = paint_lesions(rng, lesions, axes, probs, mm)
    crop_distractors, contrast = None, None
    if distractors is not None:
        crop_distractors = draw_distractors(distractors, probs, lesion_map, axes, mm)
        contrast = draw_distractor_contrast(distractors)
    crop_images = render(rng, probs, lesion_map, axes, mm, distractors=crop_distractors, distractor_contrast=contrast)
    brain = (probs.sum(0) > 0.5) | (lesion_map > 0)
    crop_healthy = np.where(brain, np.argmax(probs, axis=0).astype(np.uint8) + 1, BG).astype(np.uint8)
    crop_tissue = np.where(lesion_map > 0, lesion_map, crop_healthy)
    images = {}
    for name in MODALITIES:
        images[name] = np.zeros(shape, np.int16)
        images[name][box] = crop_images[name]
    tissue, healthy = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    tissue[box], healthy[box] = crop_tissue, crop_healthy
    affine = brats_affine(shape, physical_spacing(shape) if spacing is None else spacing)
    full_distractors = None
    if crop_distractors is not None:
        full_distractors = np.zeros(shape, np.uint8)
        full_distractors[box] = crop_distractors
    return SynthCase(images, TISSUE_CLASS[tissue], tissue, healthy, affine, full_distractors)


# Each schema class is painted from the generator's tissues: its glioma classes (1 NCR incl. non-enhancing core,
# 2 oedema, 3 ET) or the fluid-filled cavity (a resection cavity, or in paediatric tumours a cyst).
CLASS_SOURCES = {"ncr": (1,), "netc": (1,), "ed": (2,), "snfh": (2,), "et": (3,), "gtv": (1, 3), "rc": ("cavity",),
                 "cc": ("cavity",)}


def schema_seg(case: SynthCase, schema: LabelSchema | str) -> np.ndarray:
    """The case's label map in `schema`'s values (uint8), e.g. "brats2021" (ET 4) or "brats2023" (ET 3)."""
    out = np.zeros(case.classes.shape, np.uint8)
    for value, name in resolve_schema(schema).labels:
        for source in CLASS_SOURCES.get(name, ()):
            mask = case.tissue == TISSUES.index(source) if source == "cavity" else case.classes == source
            out[mask] = value
    return out


def layout_arrays(case: SynthCase, release: Release) -> dict[str, np.ndarray]:
    """Array key -> data as the release stores it (seg in its own label values; MSD: one 4D image)."""
    seg = schema_seg(case, release.label_schema)
    if release.layout.channels:
        return {"image": np.stack([case.images[m] for m in release.layout.channels], axis=-1), "seg": seg}
    return {**{m: case.images[m] for m in release.modalities}, "seg": seg}


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of case `index`: a child seed of `seed`, so a case does not depend on how many are generated."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


@dataclass(frozen=True)
class Options:
    """What brats-synth can add to the default cases; off by default, so the default output stays as it was."""

    distractors: bool = False  # bright healthy structures, labelled background (synth/distractors.py)
    healthy_fraction: float = 0.0  # share of heads without a tumour
    nonenhancing: float | None = None  # share of gliomas without enhancing tumour (None: tumour.KINDS's 8 %)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.healthy_fraction) <= 1.0:
            raise BratsError(f"healthy fraction must be in [0, 1], got {self.healthy_fraction}")
        if self.nonenhancing is not None and not 0.0 <= float(self.nonenhancing) <= 1.0:
            raise BratsError(f"non-enhancing share must be in [0, 1], got {self.nonenhancing}")

    def is_healthy(self, index: int) -> bool:
        """Case `index` has no tumour: a low-discrepancy rule, so any run of cases holds about the fraction asked
        for and a case's answer does not depend on how many are generated."""
        return ((index + 1) * GOLDEN) % 1.0 < self.healthy_fraction

    @property
    def tag(self) -> str:
        """What the options add to a file's header tag ("" by default), so a resume with other options is refused."""
        return (" +distractors" if self.distractors else "") + \
            (f" healthy={self.healthy_fraction:g}" if self.healthy_fraction else "") + \
            (f" nonenhancing={self.nonenhancing:g}" if self.nonenhancing is not None else "")


def case_options(release: Release, seed: int, index: int, options: Options) -> dict:
    """generate_case's keyword arguments for case `index`. Option draws (cysts, distractors) come from their own
    stream, a sibling of case_rng's, so a case with options keeps the head, tumour and scanner it has without."""
    extra = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1)))
    names = release.label_schema.class_names
    cyst = extra.random() < CYSTS
    return {"cavity": "rc" in names or ("cc" in names and cyst), "tumour": not options.is_healthy(index),
            "metastases": release.metastases, "distractors": extra if options.distractors else None,
            "nonenhancing": options.nonenhancing}


def _tag(release: Release, seed: int, index: int, options: Options) -> bytes:
    return f"brats-synth {release.version} seed={seed} case={index}{options.tag}".encode()


def _save(path: Path, data: np.ndarray, affine: np.ndarray, tag: bytes) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = tag
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _is_ours(path: Path, tag: bytes, shape: tuple[int, ...]) -> bool:
    """True if `path` is a NIfTI this generator wrote for the same seed, case and shape."""
    try:
        header = nib.load(path).header
    except Exception:  # anything unreadable is not ours; the caller names the folder
        return False
    return bytes(header["descrip"]).rstrip(b"\0") == tag and tuple(header.get_data_shape()) == shape


def _case_done(folder: Path, files: dict[str, Path], tag: bytes, shape: tuple[int, ...]) -> bool:
    """Whether the case folder already holds this exact case (seg is written last, so it marks completion).

    Our own leftovers from an interrupted run (temp files, some images without seg) are fine to replace; anything
    else in the folder is refused, since it may be real data.
    """
    ours = {p.name for p in files.values()}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".tmp-"):
            entry.unlink()  # stale temp file from a killed run: never a complete file
        elif entry.name not in ours or not _is_ours(entry, tag, shape):
            raise BratsError(
                f"case folder {folder} already holds {entry.name}, which is not this synthetic case "
                f"({tag.decode()}, shape {list(shape)}); pass overwrite (brats-synth --overwrite) to replace it, "
                "or choose another output folder"
            )
    return files["seg"].exists()


def _write_case(out: Path, layout: str, seed: int, index: int, shape: tuple[int, ...], options: Options) -> float:
    """Generate and save case `index` (images first, seg last: the seg file marks a complete case); returns seconds."""
    start = time.perf_counter()
    release = resolve_release(layout)
    name = case_name(layout, index)
    case = generate_case(case_rng(seed, index), shape, **case_options(release, seed, index, options))
    arrays = layout_arrays(case, release)
    for key, filename in layout_files(release, name).items():
        _save(case_folder(out, release, name) / filename, arrays[key], case.affine, _tag(release, seed, index, options))
    return time.perf_counter() - start


def _check_request(cases: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The grid as a tuple; BratsError for a case count or a shape the generator cannot make."""
    shape = tuple(int(n) for n in shape)
    if int(cases) < 1:
        raise BratsError(f"cases must be at least 1, got {cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise BratsError(f"shape must be three sizes of at least 16 voxels, got {list(shape)}")
    return shape


def _output_folder(out: str | Path) -> Path:
    """`out`, created if needed; BratsError unless it is a writable folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BratsError(f"cannot create output folder {out}: {e.strerror}") from e
    if not out.is_dir() or not os.access(out, os.W_OK):
        raise BratsError(f"output folder {out} is not a writable folder")
    return out


def _is_complete(out: Path, release: Release, layout: str, seed: int, index: int, shape: tuple[int, ...],
                 options: Options, overwrite: bool) -> bool:
    """Whether case `index` is already on disk as this generator would write it (then it is skipped: resume).
    BratsError when its folder holds anything else, unless `overwrite`."""
    name = case_name(layout, index)
    folder = case_folder(out, release, name)
    files = {key: folder / filename for key, filename in layout_files(release, name).items()}
    tag = _tag(release, seed, index, options)
    if release.layout.channels:  # one shared folder: a case is done when its label map is ours
        return not overwrite and files["seg"].is_file() and _is_ours(files["seg"], tag, shape)
    if folder.exists() and not folder.is_dir():
        raise BratsError(f"{folder} exists and is not a case folder")
    return folder.is_dir() and not overwrite and _case_done(folder, files, tag, shape)


def _write_cases(jobs: list[tuple[Path, str, int, int, tuple[int, ...], Options]], workers: int
                 ) -> Iterator[tuple[int, float]]:
    """Write each job's case (`workers` processes when more than one case), yielding (index, seconds) in order."""
    if not jobs:
        return
    shape = jobs[0][4]  # load the atlas before forking workers: they inherit it instead of each reading it again
    tissue_for_spacing(tuple(round(float(v), 3) for v in FULL_MM / np.array(shape)))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            yield from zip((j[3] for j in jobs), pool.map(_write_case, *zip(*jobs, strict=True)), strict=True)
    else:
        for job in jobs:
            yield job[3], _write_case(*job)


def _write_msd_index(out: Path, names: Sequence[str]) -> None:
    """MSD's dataset.json: the task description and every case's image and label file."""
    training = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]
    atomic_write_json(out / "dataset.json", {**MSD_DATASET, "numTraining": len(names), "training": training})


def write_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    layout: str = "brats2021",
    shape: Sequence[int] = FULL_SHAPE,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
    distractors: bool = False,
    healthy_fraction: float = 0.0,
    nonenhancing: float | None = None,
) -> list[Path]:
    """Write `cases` synthetic cases in a BraTS layout under `out` (`workers` processes); returns the case folders.

    Re-running the same command skips finished cases (resumes after a kill); a folder holding anything else is
    refused unless `overwrite`. `distractors`: add bright healthy structures (labelled background);
    `healthy_fraction`: that share of the heads has no tumour; `nonenhancing`: the share of gliomas without enhancing
    tumour (None: the generator's 8 %). All off by default (the output is then unchanged).
    """
    options = Options(bool(distractors), float(healthy_fraction), None if nonenhancing is None else float(nonenhancing))
    release = resolve_release(layout)
    layout = RELEASE_ALIASES.get(layout, layout)
    shape = _check_request(cases, shape)
    out = _output_folder(out)

    def report(i: int, status: str) -> None:
        if progress:
            print(f"[{i + 1}/{cases}] {case_name(layout, i)}: {status}", flush=True)

    pending = []  # check every folder before writing anything, so a refusal comes first
    for i in range(int(cases)):
        if _is_complete(out, release, layout, seed, i, shape, options, overwrite):
            report(i, "complete, skipped")
        else:
            pending.append(i)
    for i, seconds in _write_cases([(out, layout, seed, i, shape, options) for i in pending], workers):
        report(i, f"written in {seconds:.1f} s")
    names = [case_name(layout, i) for i in range(int(cases))]
    if release.layout.channels:
        _write_msd_index(out, names)
        return [out / "imagesTr" / n for n in names]
    return [out / n for n in names]
