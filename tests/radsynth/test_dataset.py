import numpy as np
import pytest

from radsynth.dataset import DatasetError, levels_for, load_dataset, save_dataset, to_float, to_uint8
from radsynth.latent import z_from_seed


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {r: rng.integers(0, 256, (5, 1, r, r), dtype=np.uint8) for r in (4, 8)}
    ds = save_dataset(tmp_path / "ds", imgs, ["p1", "p1", "p2", "p3", "p4"], [0, 0, 1, 2, 1],
                      ["train", "train", "val", "test", "train"], ["A", "B", "C"])
    again = load_dataset(tmp_path / "ds")
    assert again.classes == ["A", "B", "C"] and again.levels == [4, 8]
    np.testing.assert_array_equal(again.images(8), imgs[8])
    np.testing.assert_array_equal(again.images(4, "train"), imgs[4][[0, 1, 4]])
    assert again.split_labels("train").tolist() == [0, 0, 1]
    assert ds.meta["counts"]["train"] == {"A": 2, "B": 1, "C": 0}
    with pytest.raises(DatasetError):
        again.images(16)


def test_bad_shapes_write_nothing(tmp_path):
    with pytest.raises(DatasetError):
        save_dataset(tmp_path / "ds", {8: np.zeros((2, 1, 4, 4), np.uint8)}, ["a", "b"], [0, 0], ["train", "val"], ["A"])
    assert not (tmp_path / "ds").exists()


def test_levels_and_scaling():
    assert levels_for(128) == [4, 8, 16, 32, 64, 128]
    with pytest.raises(DatasetError):
        levels_for(100)
    x = np.array([0, 128, 255], np.uint8)
    assert to_float(x).tolist() == [-1.0, pytest.approx(0.0039216, abs=1e-6), 1.0]
    np.testing.assert_array_equal(to_uint8(to_float(x)), x)


def test_latent_is_seeded_and_documented():
    a, b = z_from_seed(7, 3, 16), z_from_seed(7, 3, 16)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (3, 16)
    expected = np.random.Generator(np.random.PCG64(7)).standard_normal((3, 16), dtype=np.float32)
    np.testing.assert_array_equal(a, expected)
    assert not np.array_equal(z_from_seed(8, 3, 16), a)
    with pytest.raises(ValueError):
        z_from_seed(-1, 1, 4)
