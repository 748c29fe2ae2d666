"""Gliomas grown inside a synthetic head: placement by anatomy, irregular cores, rims, oedema along white matter.

Sizes follow BraTS: a tumour core of ~30 cm3 (log-normal, 2-110 cm3) with oedema reaching 0.5-1.5 core radii
further, so over many cases the class shares come out near the paper's Figure 3 (NCR 0.16 %, ED 0.79 %, ET 0.25 % of a
240x240x155 volume). Most tumours are necrotic with an enhancing rim; some are solid enhancing, some do not enhance
(lower grade: the core is non-enhancing tumour, BraTS label 1); some are multifocal; some reach the cortex.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from brats_unet.synth.anatomy import Push, SmoothField

# Tissue map values: healthy tissues (from the atlas), then lesion tissues, then an optional resection cavity.
TISSUES = ("background", "wm", "gm", "csf", "ed", "et", "ncr", "net", "cavity")
BG, WM, GM, CSF, ED, ET, NCR, NET, CAVITY = range(len(TISSUES))
# Internal classes (data/labels.py): 0 background, 1 NCR (necrosis and non-enhancing tumour), 2 ED, 3 ET.
TISSUE_CLASS = np.array([0, 0, 0, 0, 2, 3, 1, 1, 0], np.uint8)
KINDS = {"necrotic": 0.77, "solid": 0.15, "nonenhancing": 0.08}  # share of primary tumours (BraTS: few without ET)


def kinds_with(nonenhancing: float | None) -> dict[str, float]:
    """KINDS with the non-enhancing share set to `nonenhancing` (None: unchanged), the others scaled to fill the
    rest in their own ratio."""
    if nonenhancing is None:
        return dict(KINDS)
    rest = 1.0 - KINDS["nonenhancing"]
    return {k: (float(nonenhancing) if k == "nonenhancing" else v / rest * (1.0 - float(nonenhancing)))
            for k, v in KINDS.items()}

MULTIFOCAL = 0.12  # share of cases with a second, smaller lesion
CORTICAL = 0.3  # share of lesions placed so that the core reaches the cortex
# Brain metastases (brats-synth --layout met): several lesions, most of them small (a few mm: the lesion-wise score's
# hard cases), at the grey-white junction, above and below the tentorium; the small ones solid, the large ones
# necrotic with a rim, each with its own (often large) vasogenic oedema.
MET_EXTRA = 1.5  # mean number of lesions beyond the first (Poisson), at most MET_MAX in all
MET_MAX = 6


@dataclass(frozen=True)
class Lesion:
    centre: np.ndarray  # mm in the BraTS grid
    core_mm: float  # core radius before stretch and lobulation
    stretch: np.ndarray  # per-axis factors of the core (and oedema) ellipsoid
    rim_mm: float  # enhancing rim thickness
    oedema_mm: float  # reach of the oedema beyond the core
    kind: str  # a key of KINDS
    push_mm: float  # radius of the ball of tissue the lesion displaces (mass effect)
    cavity_mm: float = 0.0  # radius of a resection cavity at the centre (0: none)
    lobulation: float = 0.25  # depth of the core's lobes, relative to its radius

    @property
    def push(self) -> Push:
        return Push(self.centre, self.push_mm)


def _core_volume_cm3(rng: np.random.Generator, median: float) -> float:
    return float(np.clip(np.exp(rng.normal(np.log(median), 0.65)), 2.0, 110.0))


def _pick_site(rng: np.random.Generator, axes: Sequence[np.ndarray], ok: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(ok)
    if len(idx) == 0:
        return None
    i = idx[rng.integers(len(idx))]
    step = np.array([a[1] - a[0] for a in axes])
    return np.array([a[k] for a, k in zip(axes, i, strict=True)]) + rng.uniform(-0.5, 0.5, 3) * step


def _away_from(lesions: Sequence[Lesion], axes: Sequence[np.ndarray], core: float) -> np.ndarray | bool:
    """Where a new lesion of core radius `core` may go: clear of every earlier lesion's oedema."""
    ok: np.ndarray | bool = True
    for prev in lesions:
        grid = np.meshgrid(*axes, indexing="ij", sparse=True)
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, prev.centre, strict=True)))
        ok = ok & (dist > prev.core_mm + prev.oedema_mm + core + 10)
    return ok


def draw_metastases(rng: np.random.Generator, axes: Sequence[np.ndarray], probs: np.ndarray, cavity: bool = False
                    ) -> list[Lesion]:
    """Brain metastases on the coarse grid: 1 + Poisson(MET_EXTRA) lesions (at most MET_MAX), the first of median
    3 cm3, the others of median 0.3 cm3 (0.02-60 cm3: down to 3-4 mm across), near the cortex. `cavity`: the first
    lesion, when larger than 1 cm3, has a resection cavity."""
    step = np.array([a[1] - a[0] for a in axes])
    brain = probs.sum(0) > 0.5
    depth = ndi.distance_transform_edt(brain, sampling=step)
    white = brain & (probs[0] > 0.4)
    lesions: list[Lesion] = []
    for n in range(min(1 + int(rng.poisson(MET_EXTRA)), MET_MAX)):
        volume = float(np.clip(np.exp(rng.normal(np.log(3.0 if n == 0 else 0.3), 0.9)), 0.02, 60.0))
        core = (3 * volume * 1000 / (4 * np.pi)) ** (1 / 3)
        ok = white & (depth > 0.5 * core + 2) & (depth < core + 12) & _away_from(lesions, axes, core)
        centre = _pick_site(rng, axes, ok)
        if centre is None:
            centre = _pick_site(rng, axes, white & (depth > core + 2) & _away_from(lesions, axes, core))
        if centre is None:
            continue
        lesions.append(Lesion(
            centre=centre, core_mm=core, stretch=rng.uniform(0.85, 1.15, 3), rim_mm=float(rng.uniform(1.5, 4.0)),
            oedema_mm=float(core * rng.uniform(0.5, 2.0) + rng.uniform(0, 6)),
            kind="necrotic" if volume > 1.0 else "solid", push_mm=float(core * rng.uniform(0.3, 0.6)),
            cavity_mm=float(core * rng.uniform(0.6, 0.9)) if cavity and n == 0 and volume > 1.0 else 0.0,
            lobulation=0.25 * min(1.0, core / 10.0),  # small ones round: deep lobes would cut them to nothing
        ))
    return lesions


def draw_lesions(rng: np.random.Generator, axes: Sequence[np.ndarray], probs: np.ndarray, supratentorial: np.ndarray,
                 cavity: bool = False, kinds: dict[str, float] | None = None) -> list[Lesion]:
    """Lesions for one head, placed on a coarse grid (`axes`, healthy `probs`): cores in white matter above the
    tentorium, deep or (sometimes) reaching the cortex, a second one in multifocal cases. `kinds`: the share of each
    tumour kind (default KINDS)."""
    kinds = KINDS if kinds is None else kinds
    step = np.array([a[1] - a[0] for a in axes])
    brain = probs.sum(0) > 0.5
    depth = ndi.distance_transform_edt(brain, sampling=step)
    white = brain & (probs[0] > 0.5) & supratentorial
    kind = str(rng.choice(list(kinds), p=list(kinds.values())))
    lesions: list[Lesion] = []
    for n in range(2 if rng.random() < MULTIFOCAL else 1):
        volume = _core_volume_cm3(rng, 28.0 if n == 0 else 6.0)
        if kind == "solid":  # solid enhancing tumours are the smaller ones
            volume *= 0.5
        core = (3 * volume * 1000 / (4 * np.pi)) ** (1 / 3)
        if rng.random() < CORTICAL:
            ok = white & (depth > 0.5 * core) & (depth < 1.0 * core + 4)
        else:
            ok = white & (depth > max(core + 4, 12))
        ok = ok & _away_from(lesions, axes, core)  # a second focus is a separate lesion, away from the first
        centre = _pick_site(rng, axes, ok)
        if centre is None:  # small or odd head: any white matter away from the surface
            centre = _pick_site(rng, axes, brain & (probs[0] > 0.3) & (depth > 8))
        if centre is None:
            continue
        lesions.append(Lesion(
            centre=centre, core_mm=core, stretch=rng.uniform(0.8, 1.25, 3), rim_mm=float(rng.uniform(4.0, 10.0)),
            oedema_mm=float(core * rng.uniform(0.25, 0.85) + rng.uniform(2, 8)), kind=kind,
            push_mm=float(core * rng.uniform(0.45, 0.8)),
            cavity_mm=float(core * rng.uniform(0.6, 0.9)) if cavity and n == 0 else 0.0,
        ))
        kind = str(rng.choice(["necrotic", "solid"])) if kind != "nonenhancing" else kind
    return lesions


def _ellipsoid_level(axes: Sequence[np.ndarray], centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """sqrt(sum(((p - centre) / semi)^2)) on the grid: 1 on the ellipsoid's surface."""
    x, y, z = ((np.asarray(a, np.float32) - np.float32(c)) / np.float32(s) for a, c, s in zip(axes, centre, semi,
                                                                                            strict=True))
    return np.sqrt(x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2)


def paint_lesions(rng: np.random.Generator, lesions: Sequence[Lesion], axes: Sequence[np.ndarray],
                  probs: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Lesion tissue map (uint8: 0 where healthy, else ED, ET, NCR, NET or CAVITY) on the grid `axes`."""
    shape = probs.shape[1:]
    out = np.zeros(shape, np.uint8)
    brain = probs.sum(0) > 0.5
    csf_only = probs[2] > 0.9  # ventricles and cisterns: displaced by a tumour, never filled by it
    # Oedema is fluid in the white matter's extracellular space: it follows white matter and stops at CSF.
    white = brain & (probs[0] >= 0.35) & (probs[2] < 0.3)
    voxel = float(max(spacing))
    ring18 = ndi.generate_binary_structure(3, 2)
    for les in lesions:
        reach = (les.core_mm + les.oedema_mm) * float(les.stretch.max()) * 1.5 + 2 * voxel  # holds the oedema
        box = tuple(slice(int(np.searchsorted(a, c - reach)), int(np.searchsorted(a, c + reach)))
                    for a, c in zip(axes, les.centre, strict=True))
        sub = [a[s] for a, s in zip(axes, box, strict=True)]
        if min(len(a) for a in sub) == 0:
            continue
        b_brain, b_csf, b_white = brain[box], csf_only[box], white[box]
        lobes = np.clip(SmoothField(rng, max(0.45 * les.core_mm, 5.0), sub)(sub), -2.5, 2.5)
        level = _ellipsoid_level(sub, les.centre, les.core_mm * les.stretch) - 1 + les.lobulation * lobes
        core = (level < 0) & b_brain & ~b_csf
        depth = -level * les.core_mm  # approximate mm below the core's surface
        rim = np.maximum(les.rim_mm * (1 + 0.35 * SmoothField(rng, 8.0, sub)(sub)), 1.2 * voxel)
        labels = np.zeros(core.shape, np.uint8)
        if les.kind == "nonenhancing":
            labels[core] = NET
        elif les.kind == "solid":
            labels[core] = ET
        else:  # necrosis strictly inside the enhancing rim: no necrotic voxel touches anything but core
            ncr = core & (depth > rim) & ndi.binary_erosion(core)
            labels[core] = ET
            labels[ncr] = NCR
        # Geodesic growth through white matter (blocked by CSF and cortex) within an irregular ellipsoid: enough
        # steps that the ellipsoid, not the dilation's polyhedral front, shapes the border in open white matter.
        steps = int(np.ceil(1.5 * les.oedema_mm / float(np.mean(spacing))))
        grown = ndi.binary_dilation(core, ring18, iterations=max(steps, 1), mask=b_white | core) if core.any() \
            else core
        limit = _ellipsoid_level(sub, les.centre, (les.core_mm + 1.15 * les.oedema_mm) * les.stretch) - 1 \
            + 0.3 * np.clip(SmoothField(rng, 7.0, sub)(sub), -2, 2)
        labels[grown & ~core & (limit < 0)] = ED
        if les.cavity_mm > 0:  # post-operative: a fluid-filled hole where the tumour's centre was
            hole = (_ellipsoid_level(sub, les.centre, les.cavity_mm * les.stretch) - 1 + 0.15 * lobes < 0) & b_brain
            labels[hole] = CAVITY
        region = out[box]
        # Overlapping lesions: core beats oedema, whatever the order they are painted in.
        np.copyto(region, labels, where=_rank(labels) > _rank(region))
    return out


def _rank(labels: np.ndarray) -> np.ndarray:
    rank = np.zeros(len(TISSUES), np.uint8)
    rank[[ED, ET, NCR, NET, CAVITY]] = [1, 2, 3, 3, 4]
    return rank[labels]
