"""A short real training on the sample export (through ingest and preprocess) learns.

Signal: the squared distance between the mean image of G_ema's samples and the mean real
training image (16x16, all conditions). A working WGAN-GP pulls the generator's image
statistics toward the data's, so the distance must fall well below its value at
initialisation. A broken generator loss would not: with the sign flipped (G *minimising*
the critic's score) G is pushed away from the real data, and the same measurement rises;
the test runs that broken loss too, as a control that the measurement can fail.
It also checks the critic learned to separate real from fake: the Wasserstein estimate
E[D(real)] - E[D(fake)] ends clearly positive (a sign-flipped critic loss drives it negative).
"""

import numpy as np
import pytest

import model.trainer as trainer_module
from components.train import train
from model.checkpoint import load_generator, load_state
from model.registry import build_networks
from model.sampling import generate
from model.trainer import WASSERSTEIN
from radsynth.config import load_params
from radsynth.dataset import load_dataset, to_float

# short and fast: 0.8 kimg per phase at 8x8 then 16x16; lr 1e-3 (PG-GAN's rate with
# equalised learning rate) instead of the default 1e-4, so 30 G steps move the weights; G_ema's
# half-life 0.2 kimg (the default 10 kimg would keep G_ema ~85 % at its initial weights after 2.4 kimg)
OVERRIDES = {"train.tracking": False, "train.progress": False, "train.kimg_fade": 0.8, "train.kimg_stabilize": 0.8,
             "train.lr_g": 1e-3, "train.lr_d": 1e-3, "train.ema_kimg": 0.2}


@pytest.fixture(scope="module")
def sample_dataset(sample_export):
    from tests.components.ingest_sample import sample_run   # ingest -> preprocess on the DVC sample, once per session

    run = sample_run()
    assert run.codes["ingest"] == 0 and run.codes["preprocess"] == 0, run.logs
    return load_dataset(run.artifacts / "dataset")


def mean_image_distance(G, dataset) -> float:
    real = to_float(np.asarray(dataset.images(16, split="train")))                 # [N, 1, 16, 16]
    classes = np.repeat(np.arange(dataset.num_classes), 64)
    fake = generate(G, classes, seed=7).numpy()                                     # [3 * 64, 1, 16, 16]
    return float(((fake.mean(0) - real.mean(0)) ** 2).mean())


def test_short_training_on_the_sample_learns_and_a_broken_loss_does_not(root, sample_dataset, tmp_path, monkeypatch):
    params = load_params(root / "params.yaml", profile="tiny", overrides=OVERRIDES)
    assert 16 in sample_dataset.levels and sample_dataset.num_classes == 3
    G0, _ = build_networks(params.model, 3, 1, 16, seed=params.seed)
    before = mean_image_distance(G0.eval(), sample_dataset)

    train(params, sample_dataset.root, tmp_path / "ok")
    G, meta = load_generator(tmp_path / "ok" / "G_ema.safetensors")
    after = mean_image_distance(G, sample_dataset)
    _, info = load_state(tmp_path / "ok" / "stage_16" / "checkpoint.json")
    w_end = np.mean([h[WASSERSTEIN] for h in info["history"][-5:]])
    assert meta["classes"] == sample_dataset.classes and meta["data_md5"] == sample_dataset.meta["data_md5"]
    assert after < 0.7 * before, (before, after)
    assert w_end > 0.5

    flipped = trainer_module.generator_loss
    monkeypatch.setattr(trainer_module, "generator_loss", lambda D, fake, c: -flipped(D, fake, c))
    train(params, sample_dataset.root, tmp_path / "broken")
    G_bad, _ = load_generator(tmp_path / "broken" / "G_ema.safetensors")
    assert mean_image_distance(G_bad, sample_dataset) > 0.9 * before
