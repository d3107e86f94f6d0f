"""The naive serving design, kept only as the benchmark's baseline (do not deploy it).

A Flask endpoint that runs PyTorch eagerly once per request: no batching across requests,
JSON in and out. Served by a real WSGI server (gunicorn)::

    RADSYNTH_NAIVE_G=artifacts/train/G_ema.safetensors \\
        gunicorn -w 2 -b 127.0.0.1:8080 'serving.naive:create_app()'

    POST /generate  {"condition": "PNEUMONIA", "seed": 7, "n": 1}
      -> {"images": [[[...]]], "shape": [n, H, W, C]}   (uint8 values as JSON lists)
"""

from __future__ import annotations

import os

import numpy as np

CHECKPOINT_ENV = "RADSYNTH_NAIVE_G"


def create_app(checkpoint: str | None = None):
    """The Flask app; loads ``G`` from a ``save_generator`` checkpoint (safetensors, no pickle)."""
    import torch
    from flask import Flask, jsonify, request

    from model.checkpoint import load_generator
    from radsynth.latent import z_from_seed

    path = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if not path:
        raise RuntimeError(f"set {CHECKPOINT_ENV} to a generator checkpoint (.safetensors)")
    torch.set_num_threads(int(os.environ.get("RADSYNTH_NAIVE_THREADS", "1")))
    G, meta = load_generator(path)
    G.eval()
    classes = list(meta["classes"])
    app = Flask("radsynth-naive")

    @app.post("/generate")
    def generate():
        body = request.get_json(force=True, silent=True) or {}
        condition, n, seed = body.get("condition"), int(body.get("n", 1)), int(body.get("seed", 0))
        if condition not in classes:
            return jsonify(error=f"unknown condition {condition!r}; valid: {classes}"), 400
        z = torch.from_numpy(z_from_seed(seed, n, G.z_dim))                    # [n, z_dim]
        c = torch.full((n,), classes.index(condition), dtype=torch.int64)      # [n]
        with torch.no_grad():
            x = G(z, c)                                                         # [n, C, H, W]
        images = np.clip(np.rint((x.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return jsonify(images=images.tolist(), shape=list(images.shape))

    @app.get("/health")
    def health():
        return jsonify(status="ok", classes=classes)

    return app
