"""Every BraTS label schema end to end on synthetic cases of its own release: brats-synth --layout writes them,
brats-preprocess caches them, a tiny model trains on the schema's classes or regions, brats-predict writes the
release's own labels and file names, brats-evaluate scores the schema's regions."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_cli, compose_train, tiny_overrides

from brats_unet.cli.evaluate import evaluate
from brats_unet.cli.predict import predict
from brats_unet.data.discovery import find_file, list_case_dirs
from brats_unet.data.labels import SCHEMAS, LabelSchema
from brats_unet.synth.generator import write_dataset
from brats_unet.synth.releases import RELEASES
from brats_unet.training.fit import train
from brats_unet.training.losses import RegionDiceBCELoss, classes_from_region_logits

# (brats-synth --layout, data=..., loss): softmax and region heads both covered.
CASES = [("2024_gli", "brats2024_gli", "region"), ("met", "brats_met", "combined"), ("men", "brats_men", "region"),
         ("men_rt", "brats_men_rt", "combined"), ("ped", "brats_ped", "region"), ("ssa", "brats_ssa", "combined"),
         ("msd", "msd_brain", "region")]


def test_every_schema_decodes_regions_like_nvidia_for_nested_regions() -> None:
    glioma = SCHEMAS["brats2021"]
    # wt, tc, et on/off for every voxel pattern -> ET over TC over WT.
    combos = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1]]).T
    assert glioma.classes_from_regions(combos.astype(bool)).tolist() == [0, 2, 1, 3, 1, 3, 3, 3]
    gli = SCHEMAS["brats2024_gli"]  # singletons decide; RC is outside the tumour regions
    masks = np.zeros((6, 4), bool)
    masks[gli.region_names.index("rc"), 0] = True
    masks[gli.region_names.index("snfh"), 1] = True
    masks[[gli.region_names.index("wt"), gli.region_names.index("et")], 2] = True
    assert [gli.class_names[c] for c in gli.classes_from_regions(masks)] == ["rc", "snfh", "et", "background"]
    logits = np.where(masks, 5.0, -5.0)[None]  # the torch decoder paints in the same order
    import torch

    assert classes_from_region_logits(torch.tensor(logits), gli)[0].tolist() == gli.classes_from_regions(masks).tolist()
    with pytest.raises(ValueError, match=r"region wt holds classes \['ncr', 'ed'\] that no other region separates"):
        RegionDiceBCELoss(schema=LabelSchema.build("x", {1: "ncr", 2: "ed"}, {"wt": ("ncr", "ed")}))


def test_schema_round_trip_and_refusals() -> None:
    ped = SCHEMAS["brats_ped"]
    seg = np.array([0, 1, 2, 3, 4, 4])
    classes = ped.to_classes(seg)
    assert classes.tolist() == [0, 1, 2, 3, 4, 4] and ped.from_classes(classes).tolist() == seg.tolist()
    assert ped.region_masks(classes)[ped.region_names.index("tc")].tolist() == [False, True, True, True, False, False]
    with pytest.raises(ValueError, match=r"label values \[4\] are not brats_men labels \(allowed \[0, 1, 2, 3\]\)"):
        SCHEMAS["brats_men"].to_classes(seg)


@pytest.mark.slow
@pytest.mark.parametrize(("release", "data", "loss"), CASES)
def test_release_preprocesses_trains_predicts_and_evaluates(release: str, data: str, loss: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, cases=5, seed=1, layout=release, shape=(64, 64, 48))
    schema = SCHEMAS[RELEASES[release].schema]
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(root, tmp_path / "cache", run) if not o.startswith("data=")]
    cfg = compose_train([f"data={data}", *overrides, f"loss={loss}", "logger=none", "data.test_fraction=0.2"])
    assert cfg.data.schema == schema.name and list(cfg.preprocess.modalities) == list(cfg.data.modalities)
    metrics = train(cfg)
    expected = {f"val/dice_{r}" for r in schema.region_names}
    assert expected <= set(metrics) and 0.0 <= metrics["val/dice_mean"] <= 1.0

    out = tmp_path / "pred"
    ckpt = run / "checkpoints" / "last.ckpt"
    [written] = predict(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={root}", f"output={out}", "device=cpu",
                                                f"split_file={run / 'split.json'}", "split_subset=test"]))
    case = written.name.removesuffix(".nii.gz")
    layout = RELEASES[release].layout
    cases = {d.name: d for d in list_case_dirs(root, layout)}
    assert case in cases  # the release's own case names (MSD: imagesTr/BRATS_001.nii.gz)
    labels = np.asarray(nib.load(written).dataobj)
    image = nib.load(find_file(cases[case], layout, "t1ce"))
    assert labels.dtype == np.uint8 and labels.shape == image.shape[:3]
    assert np.allclose(nib.load(written).affine, image.affine)
    assert set(np.unique(labels).tolist()) <= set(schema.values)

    challenge = "brats2023" if release == "ssa" else schema.name
    summary = evaluate(compose_cli("evaluate", [f"pred={out}", f"truth={root}", f"output={tmp_path / 'eval'}",
                                                f"challenge={challenge}", f"split_file={run / 'split.json'}"]))
    assert summary["n_cases"] == 1
    for region in schema.region_names:
        assert 0.0 <= summary["metrics"][f"dice_{region}"]["mean"] <= 1.0


def test_schemas_agree_with_the_official_challenge_table() -> None:
    """labels.py (what we train and decode) and challenges.py (what the official package scores) name the same label
    values and the same regions as unions of values, for every schema both know."""
    from brats_unet.evaluation.challenges import CHALLENGES

    shared = sorted(set(SCHEMAS) & set(CHALLENGES))
    assert {"brats2021", "brats2023", "brats2024_gli", "brats_met", "brats_men", "brats_men_rt", "brats_ped"} <= set(
        shared)
    for name in shared:
        schema, challenge = SCHEMAS[name], CHALLENGES[name]
        assert dict(schema.labels) == challenge.labels, name
        value = {n: v for v, n in schema.labels}
        ours = {r: tuple(sorted(value[c] for c in cs)) for r, cs in schema.regions}
        assert ours == {r: tuple(sorted(v)) for r, v in challenge.regions.items()}, name


def test_challenges_take_their_labels_from_the_one_label_registry() -> None:
    """challenges.py holds no label table: a challenge names a schema and the official order of its regions."""
    from brats_unet.evaluation.challenges import CHALLENGES, Challenge

    assert CHALLENGES["brats_ssa"].schema is CHALLENGES["brats_goat"].schema is SCHEMAS["brats2023"]
    assert CHALLENGES["msd_brain"].labels == {1: "ed", 2: "netc", 3: "et"}
    assert list(CHALLENGES["brats2024_gli"].regions) == ["snfh", "et", "netc", "rc", "tc", "wt"]  # official order
    assert CHALLENGES["brats_ped"].regions["tc"] == (1, 2, 3)  # et + netc + cc, by value
    with pytest.raises(ValueError, match=r"region order \('et', 'tc'\) is not an order of schema brats2023's"):
        Challenge("partial", SCHEMAS["brats2023"], None, ("et", "tc"))
