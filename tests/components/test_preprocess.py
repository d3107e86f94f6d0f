"""Preprocess: levels, patient-level stratified split, seed determinism, explicit augmentation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from components.preprocess import PreprocessError, preprocess, split_patients
from radsynth.config import DataConfig
from radsynth.dataset import load_dataset, to_float
from tests.components.ingest_sample import SAMPLE_RESOLUTION, sample_run


@pytest.fixture(scope="module")
def run(sample_export):
    result = sample_run()
    assert result.codes["preprocess"] == 0, result.logs["preprocess"]
    return result


def test_dataset_has_every_level_and_matches_ingest(run):
    ds = load_dataset(run.artifacts / "dataset")
    assert ds.levels == [4, 8, 16, 32] and ds.img_resolution == SAMPLE_RESOLUTION
    ingested = np.load(run.artifacts / "ingest" / "images.npy")
    full = ds.images()
    assert full.dtype == np.uint8 and full.shape == ingested.shape
    np.testing.assert_array_equal(full, ingested)  # no augmentation by default: same images, same order
    small = ds.images(8)
    expected = ingested.reshape(len(ds), 1, 8, 4, 8, 4).astype(np.float64).mean(axis=(3, 5))
    np.testing.assert_array_equal(small, np.rint(expected).astype(np.uint8))
    x = to_float(ds.images(4))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert ds.meta["augment"] == {"hflip": False, "augmented_images": 0}
    assert (run.artifacts / "dataset" / "params.yaml").is_file()


def test_no_patient_in_two_splits_and_fractions_near_80_10_10(run):
    ds = load_dataset(run.artifacts / "dataset")
    owners = {}
    for patient, split in zip(ds.patients, ds.splits):
        assert owners.setdefault(patient, split) == split
    n_patients = len(owners)
    per_split = {s: sum(v == s for v in owners.values()) for s in ("train", "val", "test")}
    assert abs(per_split["train"] / n_patients - 0.8) < 0.01
    assert abs(per_split["val"] / n_patients - 0.1) < 0.01 and abs(per_split["test"] / n_patients - 0.1) < 0.01
    # Stratified: each class's share of the val/test images is close to its share overall.
    for split in ("val", "test"):
        mask = ds.splits == split
        for c in range(ds.num_classes):
            assert abs((ds.labels[mask] == c).mean() - (ds.labels == c).mean()) < 0.05


def test_same_seed_same_split_other_seed_other_split(run, tmp_path):
    first = load_dataset(run.artifacts / "dataset")
    again = preprocess(run.params, out_dir=tmp_path / "again")
    np.testing.assert_array_equal(load_dataset(again.out_dir).splits, first.splits)
    other = preprocess(dataclasses.replace(run.params, seed=run.params.seed + 1), out_dir=tmp_path / "other")
    assert (load_dataset(other.out_dir).splits != first.splits).mean() > 0.1


def test_split_is_by_patient_and_independent_of_input_order():
    cfg = DataConfig()
    rng = np.random.default_rng(0)
    patients = np.array([f"{i:020x}" for i in rng.integers(0, 300, size=1000)])
    labels = rng.integers(0, 3, size=1000)
    splits = split_patients(patients, labels, 3, cfg, seed=7)
    for p in set(patients):
        assert len(set(splits[patients == p])) == 1
    order = rng.permutation(1000)
    np.testing.assert_array_equal(split_patients(patients[order], labels[order], 3, cfg, seed=7), splits[order])


def test_bad_split_fractions_are_rejected():
    cfg = DataConfig(split_train=0.7, split_val=0.1, split_test=0.1)
    with pytest.raises(PreprocessError, match="sum to 1"):
        split_patients(np.array(["a"]), np.array([0]), 1, cfg, seed=0)


def test_hflip_only_when_asked_and_only_on_train(run, tmp_path):
    params = dataclasses.replace(run.params, data=dataclasses.replace(run.params.data, hflip=True))
    res = preprocess(params, out_dir=tmp_path / "flip")
    base = load_dataset(run.artifacts / "dataset")
    ds = load_dataset(res.out_dir)
    n_train = int((base.splits == "train").sum())
    assert res.augmented == n_train and len(ds) == len(base) + n_train
    extra = ds.images()[len(base):]
    np.testing.assert_array_equal(extra, base.images(split="train")[..., ::-1])
    assert set(ds.splits[len(base):]) == {"train"}
    assert json.loads((res.out_dir / "dataset.json").read_text())["augment"]["hflip"] is True


def test_missing_ingest_output_is_a_clear_error(run, tmp_path):
    with pytest.raises(PreprocessError, match="run `radsynth ingest` first"):
        preprocess(run.params, ingest_dir=tmp_path / "nothing", out_dir=tmp_path / "ds")
