"""split.json: which cases train, validate and test a run. One schema, one writer, one reader.

{"train": [case, ...], "val": [...], "test": [...], "seed": <split seed>, "fold": <validation fold>,
 "num_folds": <number of folds, 1 for a single split>, "val_fraction", "test_fraction", "train_cases", "val_cases",
 "stratify"} (the last five since the split is checked against the config: older files lack them).

`SplitSpec` is what a data config asks of a split (data.val_fraction ... data.split_seed); a run folder's split.json
is checked against it, so a run dir that holds fold 0 cannot silently train `data.fold=2` on fold 0's cases.

K-fold splits rank cases by a SHA-256 of (seed, case name), so the same seed puts the same cases in the same folds on
any machine, Python or numpy (a Generator's stream may change between numpy releases). The single split keeps its
numpy permutation: it predates the folds, and finished runs must keep their cases.

`stratify` (data.stratify) deals each stratum (a case's tumour regions present, `stratum`: no tumour, no enhancing
tumour, ...) into test, validation and training in proportion, so validation, where the post-processing rules and the
best checkpoint are chosen, holds a head without tumour or a tumour without ET whenever the data has enough of them.
Within a stratum the cases keep the order above.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_unet.utils import BratsError

SUBSETS = ("train", "val", "test")


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), but at least one case for any positive fraction."""
    return max(1, round(fraction * n)) if fraction > 0 and n > 0 else 0


def hash_order(cases: Sequence[str], seed: int) -> list[str]:
    """Case names ranked by SHA-256 of "<seed>:<name>": a seeded shuffle that is the same everywhere."""
    return sorted((str(c) for c in cases), key=lambda c: (hashlib.sha256(f"{seed}:{c}".encode()).hexdigest(), c))


def fold_of(cases: Sequence[str], seed: int, num_folds: int) -> dict[str, int]:
    """Validation fold of each case: round-robin over the hash order, so fold sizes differ by at most one."""
    return {c: i % num_folds for i, c in enumerate(hash_order(cases, seed))}


def check_folds(num_folds: Any, fold: Any) -> None:
    """BratsError naming the key unless 0 <= fold < num_folds (integers); brats-train checks this before caching."""
    if not _is_int(num_folds) or num_folds < 1:
        raise BratsError(f"data.num_folds must be an integer >= 1, got {num_folds!r}")
    if not _is_int(fold) or not 0 <= fold < num_folds:
        hint = " (data.fold picks a fold of a k-fold split: set data.num_folds too)" if num_folds == 1 else ""
        raise BratsError(f"data.fold must be in [0, {num_folds}) for data.num_folds={num_folds}, got {fold!r}{hint}")


@dataclass(frozen=True)
class SplitSpec:
    """The split a data config asks for: conf/data/*.yaml's val_fraction, test_fraction, train_cases, val_cases,
    num_folds, fold and split_seed (here `seed`)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    train_cases: int | None = None
    val_cases: int | None = None
    num_folds: int = 1
    fold: int = 0
    seed: int = 0
    stratify: bool = False

    def make(self, cases: Sequence[str], strata: Mapping[str, Hashable] | None = None) -> dict[str, Any]:
        return make_split(cases, **asdict(self), strata=strata)

    def deciding(self) -> dict[str, Any]:
        """The fields that decide which case goes where (k folds ignore the validation fraction and counts)."""
        keys = (("num_folds", "fold", "seed", "test_fraction", "stratify") if self.num_folds > 1 else
                ("num_folds", "seed", "test_fraction", "train_cases", "val_cases", "stratify")
                + (("val_fraction",) if self.val_cases is None else ()))
        return {k: getattr(self, k) for k in keys}

    def mismatches(self, split: dict[str, Any]) -> list[str]:
        """'data.<key>: split.json has X, the config asks Y' for each deciding field a stored split records
        differently (a split.json written before a field was recorded is not compared on it)."""
        out = []
        for key, asked in self.deciding().items():
            stored = split.get(key)
            if key not in split or (stored is None and key in ("seed", "fold")):  # not recorded: older file
                continue
            if stored != asked:
                name = "data.split_seed" if key == "seed" else f"data.{key}"
                out.append(f"{name}: split.json has {stored!r}, the config asks {asked!r}")
        return out


def make_split(
    cases: Sequence[str],
    *,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    train_cases: int | None = None,
    val_cases: int | None = None,
    num_folds: int = 1,
    fold: int = 0,
    stratify: bool = False,
    strata: Mapping[str, Hashable] | None = None,
) -> dict[str, Any]:
    """Seeded split of case names. Test cases are held out first; the rest is split by fractions, by absolute
    counts (train_cases/val_cases win over val_fraction), or into `num_folds` folds with `fold` as validation.

    With folds, val_fraction is unused: the test cases (test_fraction, the first of the hash order) are the same for
    every fold, and each other case is in exactly one fold's validation set. With `stratify`, `strata` gives each
    case's stratum and every subset (and fold) takes its share of each stratum (`_deal`, `_deal_folds`)."""
    if stratify and (strata is None or set(map(str, cases)) - set(strata)):
        raise BratsError("data.stratify needs each case's stratum (its tumour regions, from the cache)")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise BratsError(
            f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    check_folds(num_folds, fold)
    if num_folds > 1:
        if train_cases is not None or val_cases is not None:
            raise BratsError("data.train_cases/data.val_cases cannot be combined with data.num_folds > 1")
        order = hash_order(cases, seed)
        n_test = _count(test_fraction, len(order))
        # the same test cases for every fold
        test, rest = _deal(order, strata, n_test) if stratify else (order[:n_test], order[n_test:])
        if len(rest) < num_folds:
            raise BratsError(f"data.num_folds={num_folds} needs at least {num_folds} non-test cases, have {len(rest)}")
        folds = _deal_folds(rest, strata, num_folds) if stratify else fold_of(rest, seed, num_folds)
        val = [c for c in rest if folds[c] == fold]
        train = [c for c in rest if folds[c] != fold]
        spec = SplitSpec(val_fraction, test_fraction, None, None, num_folds, fold, seed, stratify)
        return _finish(train, val, test, spec, len(order))
    order = [str(c) for c in np.random.default_rng(seed).permutation(sorted(cases))]
    n_test = _count(test_fraction, len(order))
    if stratify:
        return _stratified(order, strata, n_test, val_fraction, train_cases, val_cases,
                           SplitSpec(val_fraction, test_fraction, train_cases, val_cases, 1, 0, seed, True))
    test, rest = order[:n_test], order[n_test:]
    if train_cases is not None or val_cases is not None:
        n_val, n_train = _sizes(len(order), val_fraction, train_cases, val_cases, len(rest), len(test))
        val, train = rest[:n_val], rest[n_val : n_val + n_train]
    else:
        n_val = _count(val_fraction, len(order))
        val, train = rest[:n_val], rest[n_val:]
    spec = SplitSpec(val_fraction, test_fraction, train_cases, val_cases, num_folds, fold, seed)
    return _finish(train, val, test, spec, len(order))


def _sizes(n: int, val_fraction: float, train_cases: int | None, val_cases: int | None, n_rest: int, n_test: int
           ) -> tuple[int, int]:
    """(validation, training) counts of a single split of n cases by data.train_cases / data.val_cases;
    BratsError naming the keys when they ask for more than the n_rest cases left after the test cases."""
    n_val = val_cases if val_cases is not None else _count(val_fraction, n)
    n_train = train_cases if train_cases is not None else n_rest - n_val
    if n_train < 1 or n_val < 0 or n_train + n_val > n_rest:
        raise BratsError(
            f"data.train_cases={train_cases} and data.val_cases={val_cases} ask for {n_train} training and "
            f"{n_val} validation cases, but only {n_rest} cached cases are left after holding out "
            f"{n_test} test cases"
        )
    return n_val, n_train


def _stratified(order: list[str], strata: Mapping[str, Hashable], n_test: int, val_fraction: float,
                train_cases: int | None, val_cases: int | None, spec: SplitSpec) -> dict[str, Any]:
    """The single split with every subset taking its share of each stratum: test first, then validation, then
    training (train_cases: that many of the rest, dealt the same way)."""
    n = len(order)
    test, rest = _deal(order, strata, n_test)
    if train_cases is not None or val_cases is not None:
        n_val, n_train = _sizes(n, val_fraction, train_cases, val_cases, len(rest), len(test))
    else:
        n_val = min(_count(val_fraction, n), len(rest))
        n_train = len(rest) - n_val
    val, rest = _deal(rest, strata, n_val, order)
    train, _ = _deal(rest, strata, n_train, order)
    return _finish(train, val, test, spec, n)


def _by_stratum(cases: Sequence[str], strata: Mapping[str, Hashable]) -> dict[Hashable, list[str]]:
    groups: dict[Hashable, list[str]] = {}
    for c in cases:
        groups.setdefault(strata[c], []).append(c)
    return groups


def _deal(cases: list[str], strata: Mapping[str, Hashable], k: int, population: Sequence[str] | None = None
          ) -> tuple[list[str], list[str]]:
    """(taken, left): k of `cases`, each stratum giving its share of k by largest remainder, the stratum's
    first cases in `cases`' order. Shares are of the whole population (all cases; default `cases`), so the test and
    validation sets take the same share of a stratum; ties go to the rarer stratum, which would otherwise go unseen."""
    population = population or cases
    groups, total, n = _by_stratum(cases, strata), Counter(strata[c] for c in population), len(population)
    take = {s: min(k * total[s] // n, len(groups[s])) for s in groups}  # integers: exact ties
    for s in sorted(groups, key=lambda s: (-(k * total[s] % n), total[s], str(s))):
        if sum(take.values()) >= k:
            break
        take[s] += take[s] < len(groups[s])
    while sum(take.values()) < k:  # strata ran out of cases: fill from the largest left
        s = max(groups, key=lambda s: (len(groups[s]) - take[s], str(s)))
        take[s] += 1
    taken = {c for s, cs in groups.items() for c in cs[:take[s]]}
    return [c for c in cases if c in taken], [c for c in cases if c not in taken]


def _deal_folds(cases: list[str], strata: Mapping[str, Hashable], num_folds: int) -> dict[str, int]:
    """Validation fold of each case, stratified: the strata one after another (rarest first), each in `cases`'
    order, dealt round-robin with one counter, so fold sizes differ by at most one and so do a stratum's shares."""
    groups = _by_stratum(cases, strata)
    ranked = [c for cs in sorted(groups.values(), key=lambda cs: (len(cs), str(strata[cs[0]]))) for c in cs]
    return {c: i % num_folds for i, c in enumerate(ranked)}


def stratum(class_voxels: Mapping[str, int], regions: Sequence[tuple[str, Sequence[str]]]) -> str:
    """A case's stratum for data.stratify: the evaluated regions its label map holds ("wt+tc+et", "wt+tc" for a
    tumour without enhancing tumour, "none" for a head without tumour), from class voxel counts by class name and
    the schema's (region, class names) pairs."""
    present = [r for r, classes in regions if any(int(class_voxels.get(c, 0)) > 0 for c in classes)]
    return "+".join(present) or "none"


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _finish(train: list[str], val: list[str], test: list[str], spec: SplitSpec, n: int) -> dict[str, Any]:
    if not train:
        raise BratsError(f"no training cases left: {n} cached cases, check data.val_fraction/test_fraction")
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test), **asdict(spec)}


def load_split(path: str | Path, cached: Collection[str] | None = None, cache_path: Path | None = None,
               need_train: bool = True) -> dict[str, Any]:
    """Read and check a split.json; with `cached`, every case it names must be among them (cases in the cache).

    A split a run trains on needs training cases; one that only names cases to predict or score need not."""
    path = Path(path).expanduser()
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BratsError(f"{path}: cannot read the split file: {e}") from e
    if not isinstance(split, dict) or (need_train and not (isinstance(split.get("train"), list) and split["train"])):
        raise BratsError(f"{path}: a split file needs a non-empty list under 'train' (and 'val', 'test')")
    for subset in SUBSETS:
        if not isinstance(split.get(subset, []), list):
            raise BratsError(f"{path}: '{subset}' must be a list of case names")
    if cached is not None:
        unknown = sorted(set().union(*(split.get(k, []) for k in SUBSETS)) - set(cached))
        if unknown:
            where = f" {cache_path}" if cache_path else ""
            raise BratsError(f"{path}: names {len(unknown)} cases missing from the cache{where}: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return {
        "train": [str(c) for c in split.get("train", [])],
        "val": [str(c) for c in split.get("val", [])],
        "test": [str(c) for c in split.get("test", [])],
        "seed": split.get("seed"),
        "fold": split.get("fold"),
        "num_folds": split.get("num_folds", 1),  # split files written before k-fold support hold one split
        **{k: split[k] for k in ("val_fraction", "test_fraction", "train_cases", "val_cases", "stratify")
           if k in split},
    }


def read_split(path: str | Path, subset: str) -> list[str]:
    """Case names of one subset (train | val | test) of a run's split.json."""
    if subset not in SUBSETS:
        raise BratsError(f"split_subset must be one of {list(SUBSETS)}, got {subset!r}")
    return load_split(path, need_train=False)[subset]
