"""Finding BraTS cases on disk: the layouts' file names, case folders (or MSD's imagesTr/labelsTr), the files of one
case, and which layout a folder is in. Nothing here reads a volume (that is brats_unet.data.cases).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_unet.data.labels import LAYOUTS, MODALITIES, Layout
from brats_unet.utils import BratsError

log = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii")  # preferred first: when both exist the compressed file is read


@dataclass(frozen=True)
class CaseFiles:
    """One case on disk."""

    case: str  # folder name, e.g. "BraTS2021_00000"
    images: dict[str, Path]  # canonical modality -> file
    seg: Path | None  # None for unlabelled (prediction-only) cases


def resolve_layout(layout: Layout | str) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise BratsError(f"unknown data layout {layout!r}; choose one of {sorted(LAYOUTS)} (config key data.layout)")
    return LAYOUTS[layout]


def expected_pattern(layout: Layout) -> str:
    if layout.channels:
        return (f"<root>/imagesTr/<case>.nii.gz (4D: {', '.join(layout.channels)}) and <root>/labelsTr/<case>.nii.gz "
                f"(layout {layout.name})")
    keys = ",".join(layout.suffixes[k] for k in (*MODALITIES, "seg"))
    return f"<root>/<case>/<case>{layout.separator}{{{keys}}}.nii.gz (layout {layout.name})"


def layout_order(preferred: Layout | str | None) -> list[Layout]:
    """The preferred layout first, then the others: case files may use either release's naming."""
    first = [resolve_layout(preferred)] if preferred else []
    return first + [layout for layout in LAYOUTS.values() if layout not in first]


def subfolders(root: Path, key: str | None = None) -> list[Path]:
    """Sorted case-folder candidates under `root`; with `key`, a BratsError naming it if root is not a folder.

    Hidden and underscore folders are tool leftovers (.ipynb_checkpoints, __MACOSX), never cases.
    """
    if key is not None and not root.exists():
        raise BratsError(f"{key} {root} does not exist")
    if key is not None and not root.is_dir():
        raise BratsError(f"{key} {root} is not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def list_case_dirs(root: str | Path, layout: Layout | str) -> list[Path]:
    """Case folders under `root`, sorted by name. BratsError naming root and the expected pattern if there are none."""
    layout = resolve_layout(layout)
    root = Path(root).expanduser()
    pattern = expected_pattern(layout)
    if not root.exists():
        raise BratsError(f"data root {root} does not exist; expected {pattern} (config key data.root)")
    if not root.is_dir():
        raise BratsError(f"data root {root} is not a folder; expected {pattern} (config key data.root)")
    if layout.channels:  # MSD: cases are the 4D images in imagesTr/, named here as <root>/imagesTr/<case>
        images = root / "imagesTr"
        names = sorted({p.name[: -len(e)] for e in EXTENSIONS for p in images.glob(f"*{e}")
                        if p.is_file() and not p.name.startswith((".", "_"))}) if images.is_dir() else []
        dirs = [images / name for name in names]
    else:
        dirs = subfolders(root)
    if not dirs:
        raise BratsError(f"data root {root} holds no case folders; expected {pattern} (config key data.root)")
    return dirs


def find_file(case_dir: Path, layout: Layout, key: str) -> Path | None:
    """`<case_dir>/<case><sep><suffix>.nii.gz` (or `.nii`) for one modality or "seg", if present. MSD: the case's 4D
    image `<root>/imagesTr/<case>.nii.gz` for every modality, its label map `<root>/labelsTr/<case>.nii.gz`."""
    folder = case_dir
    if layout.channels:
        folder = case_dir.parent.parent / "labelsTr" if key == "seg" else case_dir.parent
    for ext in EXTENSIONS:
        path = folder / layout.filename(case_dir.name, key, ext)
        if path.is_file():
            return path
    return None


def _missing_message(case_dir: Path, layout: Layout, key: str) -> str:
    case = case_dir.name
    expected = layout.filename(case, key)
    if layout.channels or not case_dir.is_dir():
        return f"{case}: {expected}: missing {key} file ({expected_pattern(layout)})"
    tail = f"{layout.separator}{layout.suffixes[key]}"
    # A file for this modality under another case's name: the folder was renamed or files were copied wrongly.
    others = sorted(p.name for p in case_dir.iterdir() if p.name.endswith(tuple(tail + e for e in EXTENSIONS)))
    if others:
        return f"{case}: {others[0]}: file name does not match the case folder name (expected {expected})"
    return f"{case}: {expected}: missing {key} file (expected {case_dir / expected})"


def case_files(case_dir: str | Path, layout: Layout | str, require_seg: bool = True,
               modalities: Sequence[str] = MODALITIES) -> CaseFiles:
    """The files of one case folder (`modalities`: the sequences needed; MEN-RT ships T1c only); BratsError naming
    the case and the missing file."""
    layout, case_dir = resolve_layout(layout), Path(case_dir)
    images: dict[str, Path] = {}
    for mod in modalities:
        path = find_file(case_dir, layout, mod)
        if path is None:
            raise BratsError(_missing_message(case_dir, layout, mod))
        images[mod] = path
    seg = find_file(case_dir, layout, "seg")
    if seg is None and require_seg:
        raise BratsError(_missing_message(case_dir, layout, "seg"))
    return CaseFiles(case_dir.name, images, seg)


def find_cases(root: str | Path, layout: Layout | str, require_seg: bool = True,
               modalities: Sequence[str] = MODALITIES) -> list[CaseFiles]:
    """All cases under `root`, sorted by case name. Unknown extra files are ignored (logged once)."""
    layout = resolve_layout(layout)
    dirs = list_case_dirs(root, layout)
    note_extra_files(dirs, layout)
    return [case_files(d, layout, require_seg, modalities) for d in dirs]


def note_extra_files(case_dirs: list[Path], layout: Layout) -> list[str]:
    """Log (once) files in case folders that are no modality or seg of `layout`: they are ignored, not an error."""
    if layout.channels:
        return []  # MSD has no case folders
    def known(d: Path) -> set[str]:
        return {f"{d.name}{layout.separator}{suffix}{ext}" for suffix in layout.suffixes.values() for ext in EXTENSIONS}

    extras = sorted(f"{d.name}/{p.name}" for d in case_dirs for p in d.iterdir() if p.name not in known(d))
    if extras:
        log.warning("ignoring %d unknown files in case folders (e.g. %s)", len(extras), ", ".join(extras[:3]))
    return extras


def detect_case_files(case_dir: str | Path, modalities: Sequence[str] = MODALITIES,
                      preferred: Layout | str | None = None) -> tuple[CaseFiles, Layout]:
    """The case's files in whichever layout names all `modalities` (the preferred one first), seg if present."""
    case_dir = Path(case_dir).expanduser()
    if case_dir.parent.name == "imagesTr" and case_dir.name.endswith(EXTENSIONS):  # an MSD case by its file path
        name = next(case_dir.name.removesuffix(e) for e in EXTENSIONS if case_dir.name.endswith(e))
        case_dir = case_dir.parent / name
    if (case_dir / "imagesTr").is_dir():
        example = next(iter(sorted((case_dir / "imagesTr").glob("*.nii*"))), case_dir / "imagesTr" / "<case>.nii.gz")
        raise BratsError(f"{case_dir} is an MSD dataset root (it holds imagesTr/), not one case: pass a case, e.g. "
                         f"{example}, or the root as a folder of cases where a command takes one (input=, data.root=)")
    order = layout_order(preferred)
    for layout in order:
        images = {m: find_file(case_dir, layout, m) for m in modalities}
        if all(images.values()):
            return CaseFiles(case_dir.name, images, find_file(case_dir, layout, "seg")), layout  # type: ignore[arg-type]
    if not case_dir.is_dir():
        raise BratsError(f"case {case_dir} is not a folder of NIfTI files (nor an MSD imagesTr/<case>)")
    want = ", ".join(order[0].filename(case_dir.name, m) for m in modalities)
    raise BratsError(f"{case_dir}: the model needs modalities {list(modalities)} but the folder does not hold them in "
                     f"any known layout {sorted(LAYOUTS)} (expected e.g. {want})")
