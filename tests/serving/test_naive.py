"""The benchmark's naive baseline answers with the same images as the real path."""

from __future__ import annotations

import numpy as np
import torch

from radsynth.latent import z_from_seed
from serving.client import to_uint8
from tests.serving.conftest import CLASSES


def test_naive_endpoint_matches_the_generator(tiny, tmp_path):
    from model.checkpoint import save_generator
    from serving.naive import create_app

    G, _ = tiny
    path = save_generator(tmp_path / "G.safetensors", G, {
        "classes": CLASSES, "variant": G.variant, "z_dim": G.z_dim, "img_resolution": G.img_resolution,
        "img_channels": G.img_channels, "data_md5": "test", "params_digest": "test"})
    app = create_app(str(path)).test_client()
    response = app.post("/generate", json={"condition": "COVID", "seed": 4, "n": 2})
    assert response.status_code == 200
    images = np.asarray(response.get_json()["images"], dtype=np.uint8)      # [2, H, W, C]
    with torch.no_grad():
        expected = to_uint8(G(torch.from_numpy(z_from_seed(4, 2, G.z_dim)), torch.tensor([2, 2])).numpy())
    assert images.shape == (2, 16, 16, 1)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    bad = app.post("/generate", json={"condition": "nope"})
    assert bad.status_code == 400 and "unknown condition" in bad.get_json()["error"]
