"""The one metrics entry point: generated images + real splits -> a flat dict keyed by constants.

:func:`compute_metrics` returns a :class:`MetricsResult` whose ``values`` is a flat
``{key: float}`` dict keyed by :mod:`radsynth.metric_keys` (per condition as
``per_class(key, name)``, overall under the bare key, real-vs-real references with the
``_ref`` suffix), the metrics that could not be computed honestly under ``unavailable``
(``{key: reason}``), and the ``protocol`` that makes the numbers comparable run to run.

Distances go through torch-fidelity with two feature extractors kept apart by name:

* ``*_inception``: torch-fidelity's ``inception-v3-compat`` with the standard weights file
  (``eval.inception_weights`` or ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
  When the file is absent the keys are listed as unavailable; nothing else is computed in
  their place. Grayscale images are repeated to three channels; torch-fidelity resizes to
  299x299 (TF1-compatible bilinear).
* ``*_domain``: the penultimate features of the domain classifier
  (:mod:`model.classifier`), registered with torch-fidelity as ``radsynth-domain``.

SSIM / MS-SSIM use a Gaussian window (sigma 1.5 at window 11) on [-1, 1] images (data range
2). MS-SSIM needs the coarsest scale to be at least one window wide; at the small sizes of
this project the number of scales is reduced instead of upsampling: window 11 from 64 px
(3 scales at 64, 4 at 128, 5 from 256), window 7 from 16 px (2 scales at 16 and 32),
window 3 below (2 scales at 8). The weights of Wang et al. (2003) are truncated to the
scales used and renormalised; ``protocol["ms_ssim"]`` records the choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model import classifier as clf
from radsynth import metric_keys as mk
from radsynth.config import EvalConfig
from radsynth.dataset import Dataset, DatasetError
from radsynth.errors import RadsynthError
from radsynth.io import sha256_file, sha256_files

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"     # the file name's hash suffix (torch hub convention: sha256 prefix)
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_LAYER = "2048"
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclasses.dataclass(frozen=True)
class RealSplits:
    """Real images of one dataset at one resolution (uint8 [n, C, R, R]) with labels."""

    classes: tuple[str, ...]
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    identity: str                        # sha256 over the dataset files at this resolution

    @property
    def img_resolution(self) -> int:
        return int(self.train.shape[-1])

    @property
    def img_channels(self) -> int:
        return int(self.train.shape[1])


@dataclasses.dataclass(frozen=True)
class MetricsResult:
    values: dict[str, float]             # flat, keys from radsynth.metric_keys
    unavailable: dict[str, str]          # key -> why it was not computed
    protocol: dict                       # extractor, weights hash, sample counts, resize, seed


def dataset_identity(dataset: Dataset, res: int) -> str:
    """sha256 over ``dataset.json``, ``manifest.csv`` and ``images_<res>.npy`` (the data version)."""
    return sha256_files(dataset.root / name for name in ("dataset.json", "manifest.csv", f"images_{res}.npy"))


def real_splits(dataset: Dataset, res: int | None = None) -> RealSplits:
    """Load the three splits of ``dataset`` at resolution ``res`` (default: full)."""
    res = res or dataset.img_resolution
    if res not in dataset.levels:
        raise DatasetError(f"{dataset.root}: no level {res} (levels {dataset.levels}); the generator's resolution must be one of them")
    arrays = {}
    for split in ("train", "val", "test"):
        imgs = np.ascontiguousarray(dataset.images(res, split))
        labels = dataset.split_labels(split)
        if len(labels) == 0:
            raise DatasetError(f"{dataset.root}: the {split} split is empty; evaluation needs train, val and test images")
        arrays[split], arrays[f"{split}_labels"] = imgs, labels
    return RealSplits(classes=tuple(dataset.classes), identity=dataset_identity(dataset, res), **arrays)


# --------------------------------------------------------------------------------------
# Feature extraction through torch-fidelity
# --------------------------------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, channels: int | None = None):
        self.images = images
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i]))  # [C, H, W] uint8
        if self.channels and x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x


def _tf_features(images: np.ndarray, extractor: str, layer: str, weights: str, batch_size: int, channels: int | None = None) -> np.ndarray:
    """Features of uint8 images from a torch-fidelity feature extractor (CPU, no worker processes)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    fe = create_feature_extractor(extractor, [layer], cuda=torch.cuda.is_available(),
                                  feature_extractor_weights_path=weights, verbose=False)
    feats = get_featuresdict_from_dataset(_ImageDataset(images, channels), fe, batch_size,
                                          cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=False)
    return feats[layer].double().numpy()


def inception_weights_path(cfg: EvalConfig) -> tuple[Path | None, str]:
    """The InceptionV3 weights file, or ``None`` with the reason it is unavailable."""
    if cfg.inception_weights:
        path = Path(cfg.inception_weights)
    else:
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
        path = Path(torch_home) / "hub" / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        return None, (f"InceptionV3 weights not found at {path} (set eval.inception_weights or place "
                      f"{INCEPTION_FILE} under $TORCH_HOME/hub/checkpoints); nothing is downloaded at run time")
    try:  # a user-supplied file: refuse anything that is not a plain tensor state dict
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "fc.weight" not in state:
            return None, f"{path} is not the InceptionV3 state dict torch-fidelity expects"
    except Exception as exc:  # torch raises several types for a bad file
        return None, f"{path} could not be read safely ({type(exc).__name__}: {exc})"
    return path, ""


class FeatureCache:
    """Real-image features stored once per (data version, extractor, weights hash)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None

    def _path(self, identity: str, extractor: str, weights_sha: str) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{identity}|{extractor}|{weights_sha}".encode()).hexdigest()[:24]
        return self.root / f"features-{extractor}-{key}.npz"

    def get_or_compute(self, identity: str, extractor: str, weights_sha: str, compute) -> tuple[dict[str, np.ndarray], bool]:
        """Cached arrays, or ``compute()`` stored; returns ``(arrays, was_cached)``."""
        from radsynth.io import atomic_path

        path = self._path(identity, extractor, weights_sha)
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return {k: data[k] for k in data.files}, True
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        arrays = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
        return arrays, False


# --------------------------------------------------------------------------------------
# Distances (torch-fidelity's FID / KID / PRC on features)
# --------------------------------------------------------------------------------------


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between two feature sets (torch-fidelity's implementation)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(torch.as_tensor(f1, dtype=torch.float64))
    s2 = fid_features_to_statistics(torch.as_tensor(f2, dtype=torch.float64))
    return float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int, subset_size: int, seed: int) -> float:
    """KID (polynomial kernel MMD, mean over subsets) via torch-fidelity; subset size clipped."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = max(2, min(subset_size, len(f1), len(f2)))
    out = kid_features_to_metric(torch.as_tensor(f1), torch.as_tensor(f2), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out["kernel_inception_distance_mean"])


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019) via torch-fidelity."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    k = max(1, min(k, len(gen) - 1, len(real) - 1))
    return calculate_precision_recall_full(torch.as_tensor(gen, dtype=torch.float32),
                                           torch.as_tensor(real, dtype=torch.float32), neighborhood=k)


# --------------------------------------------------------------------------------------
# SSIM / MS-SSIM
# --------------------------------------------------------------------------------------


def ms_ssim_plan(res: int) -> tuple[int, int]:
    """``(window, scales)`` for images of side ``res`` (see the module docstring)."""
    win = 11 if res >= 64 else 7 if res >= 16 else 3
    scales = max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(res / win))) + 1))
    return win, scales


def _gauss(win: int, channels: int) -> torch.Tensor:
    sigma = 1.5 * win / 11
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, win, win).contiguous()  # [C, 1, w, w]


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure of float64 [N, C, H, W] in [-1, 1] (range 2)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    w = _gauss(win, x.shape[1])
    conv = lambda t: F.conv2d(t, w, groups=x.shape[1])  # noqa: E731 - valid filtering
    mx, my = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)) * cs
    return ssim.mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))  # [N], [N]


def ssim(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, win: int = 11) -> np.ndarray:
    """SSIM per image pair of uint8 or [-1, 1] images ``[N, C, H, W]`` (Gaussian window)."""
    x, y = clf._as_float(x).double(), clf._as_float(y).double()
    win = min(win, x.shape[-1])
    return _ssim_parts(x, y, win)[0].numpy()


def ms_ssim(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray:
    """MS-SSIM per image pair of uint8 or [-1, 1] images ``[N, C, H, W]`` (scales per :func:`ms_ssim_plan`)."""
    x, y = clf._as_float(x).double(), clf._as_float(y).double()
    win, scales = ms_ssim_plan(x.shape[-1])
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    out = torch.ones(x.shape[0], dtype=torch.float64)
    for i in range(scales):
        s, cs = _ssim_parts(x, y, win)
        value = s if i == scales - 1 else cs
        out = out * value.clamp(min=0) ** weights[i]
        if i < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out.numpy()


# --------------------------------------------------------------------------------------
# Nearest neighbours
# --------------------------------------------------------------------------------------


def nearest(query: np.ndarray, bank: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean nearest neighbour of each query row in ``bank``: ``(distance [n], index [n])``."""
    q = torch.as_tensor(query.reshape(len(query), -1), dtype=torch.float32)
    b = torch.as_tensor(bank.reshape(len(bank), -1), dtype=torch.float32)
    dists, idx = [], []
    for part in q.split(chunk):
        d = torch.cdist(part, b)  # [n, m]
        v, i = d.min(dim=1)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists).numpy().astype(np.float64), torch.cat(idx).numpy()


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, D] in [-1, 1], scaled so distances are per-pixel RMS."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    return flat / np.sqrt(flat.shape[1])


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def compute_metrics(
    generated: np.ndarray,
    gen_labels: np.ndarray,
    real: RealSplits,
    classifier_path: str | os.PathLike,
    cfg: EvalConfig,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> MetricsResult:
    """Every metric of the evaluation, per condition and overall.

    Args:
        generated: uint8 ``[N, C, R, R]`` generated images (R = the real splits' resolution).
        gen_labels: int ``[N]`` requested condition of each generated image.
        real: the real splits at resolution R (:func:`real_splits`).
        classifier_path: the domain classifier trained on ``real.train`` (safetensors).
        cfg: the ``eval`` section (sample sizes, KID subsets, k, seeds).
        cache_dir: where real-image features are kept per data version (``None``: no cache).
        progress: show progress bars.

    Returns:
        :class:`MetricsResult` (flat values, unavailable metrics with reasons, protocol).
    """
    from tqdm import tqdm


    generated = np.asarray(generated)
    gen_labels = np.asarray(gen_labels, dtype=np.int64)
    if generated.dtype != np.uint8 or generated.ndim != 4 or generated.shape[1:] != real.test.shape[1:]:
        raise RadsynthError(f"generated images must be uint8 {list(real.test.shape[1:])} per image, got {generated.dtype} {list(generated.shape)}")
    if gen_labels.shape != (len(generated),):
        raise RadsynthError("one requested condition per generated image is needed")
    classes = list(real.classes)
    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    cache = FeatureCache(cache_dir)
    steps = tqdm(total=8, desc="metrics", unit="step", disable=not progress, leave=False)

    # Domain features: real splits cached per data version + classifier hash.
    register = clf.register_domain_extractor()
    clf_sha = sha256_file(classifier_path)
    bs = cfg.batch_size

    def real_domain() -> dict[str, np.ndarray]:
        return {s: _tf_features(getattr(real, s), register, clf.FEATURE_LAYER, str(classifier_path), bs)
                for s in ("train", "val", "test")}

    real_feats, domain_cached = cache.get_or_compute(real.identity, register, clf_sha, real_domain)
    gen_feats = _tf_features(generated, register, clf.FEATURE_LAYER, str(classifier_path), bs)
    steps.update()

    # Inception features only when the standard weights are present.
    inc_path, inc_reason = inception_weights_path(cfg)
    inc = None
    inc_sha = ""
    if inc_path is None:
        for key in (mk.FID_INCEPTION, mk.KID_INCEPTION):
            unavailable[key] = inc_reason
    else:
        inc_sha = sha256_file(inc_path)
        ch = 3

        def real_inception() -> dict[str, np.ndarray]:
            return {s: _tf_features(getattr(real, s), INCEPTION_EXTRACTOR, INCEPTION_LAYER, str(inc_path), bs, ch)
                    for s in ("val", "test")}

        inc_real, _ = cache.get_or_compute(real.identity, INCEPTION_EXTRACTOR, inc_sha, real_inception)
        inc = (_tf_features(generated, INCEPTION_EXTRACTOR, INCEPTION_LAYER, str(inc_path), bs, ch), inc_real)
    steps.update()

    # FID / KID, per condition and overall, with the val-vs-test reference.
    def distances(name_fid: str, name_kid: str, gen_f: np.ndarray, val_f: np.ndarray, test_f: np.ndarray) -> None:
        groups = [(None, np.ones(len(gen_f), bool), np.ones(len(val_f), bool), np.ones(len(test_f), bool))]
        groups += [(c, gen_labels == i, real.val_labels == i, real.test_labels == i) for i, c in enumerate(classes)]
        for c, gm, vm, tm in groups:
            key = (lambda k: k) if c is None else (lambda k, c=c: mk.per_class(k, c))
            if gm.sum() < 2 or tm.sum() < 2:
                continue
            values[key(name_fid)] = fid_from_features(gen_f[gm], test_f[tm])
            values[key(name_kid)] = kid_from_features(gen_f[gm], test_f[tm], cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
            if vm.sum() >= 2:
                values[key(name_fid) + mk.REF_SUFFIX] = fid_from_features(val_f[vm], test_f[tm])
                values[key(name_kid) + mk.REF_SUFFIX] = kid_from_features(val_f[vm], test_f[tm], cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)

    distances(mk.FID_DOMAIN, mk.KID_DOMAIN, gen_feats, real_feats["val"], real_feats["test"])
    if inc is not None:
        distances(mk.FID_INCEPTION, mk.KID_INCEPTION, inc[0], inc[1]["val"], inc[1]["test"])
    steps.update()

    # Precision / recall in domain feature space (generated vs test; val vs test as reference).
    for i, c in [(None, None)] + list(enumerate(classes)):
        gm = np.ones(len(gen_feats), bool) if i is None else gen_labels == i
        tm = np.ones(len(real.test), bool) if i is None else real.test_labels == i
        vm = np.ones(len(real.val), bool) if i is None else real.val_labels == i
        name = (lambda k: k) if c is None else (lambda k, c=c: mk.per_class(k, c))
        if gm.sum() >= 2 and tm.sum() >= 2:
            p, r = precision_recall(gen_feats[gm], real_feats["test"][tm], cfg.prc_neighborhood)
            values[name(mk.PRECISION)], values[name(mk.RECALL)] = float(p), float(r)
        if vm.sum() >= 2 and tm.sum() >= 2:
            p, r = precision_recall(real_feats["val"][vm], real_feats["test"][tm], cfg.prc_neighborhood)
            values[name(mk.PRECISION) + mk.REF_SUFFIX], values[name(mk.RECALL) + mk.REF_SUFFIX] = float(p), float(r)
    steps.update()

    # SSIM / MS-SSIM to the nearest real test image of the same condition; diversity.
    rng = np.random.default_rng(cfg.seed)
    win, scales = ms_ssim_plan(real.img_resolution)
    ssim_all, msssim_all, div_all = [], [], []
    ssim_ref_all, div_ref_all = [], []
    for i, c in enumerate(classes):
        g, t, v = generated[gen_labels == i], real.test[real.test_labels == i], real.val[real.val_labels == i]
        if len(g) == 0 or len(t) == 0:
            continue
        _, nn_idx = nearest(_pixels(g), _pixels(t))
        s, m = ssim(g, t[nn_idx], win), ms_ssim(g, t[nn_idx])
        values[mk.per_class(mk.SSIM_NEAREST, c)] = float(s.mean())
        values[mk.per_class(mk.MS_SSIM_NEAREST, c)] = float(m.mean())
        ssim_all.append(s)
        msssim_all.append(m)
        if len(v):
            _, v_idx = nearest(_pixels(v), _pixels(t))
            sr = ssim(v, t[v_idx], win)
            values[mk.per_class(mk.SSIM_NEAREST, c) + mk.REF_SUFFIX] = float(sr.mean())
            ssim_ref_all.append(sr)
        for arr, key, bucket in ((g, mk.per_class(mk.MS_SSIM_DIVERSITY, c), div_all),
                                 (t, mk.per_class(mk.MS_SSIM_DIVERSITY, c) + mk.REF_SUFFIX, div_ref_all)):
            if len(arr) < 2:
                continue
            a = rng.integers(0, len(arr), cfg.diversity_pairs)
            b = (a + rng.integers(1, len(arr), cfg.diversity_pairs)) % len(arr)  # never the same image
            d = ms_ssim(arr[a], arr[b])
            values[key] = float(d.mean())
            bucket.append(d)
    for key, parts in ((mk.SSIM_NEAREST, ssim_all), (mk.MS_SSIM_NEAREST, msssim_all), (mk.MS_SSIM_DIVERSITY, div_all),
                       (mk.SSIM_NEAREST + mk.REF_SUFFIX, ssim_ref_all), (mk.MS_SSIM_DIVERSITY + mk.REF_SUFFIX, div_ref_all)):
        if parts:
            values[key] = float(np.concatenate(parts).mean())
    steps.update()

    # Condition accuracy and confidence of the domain classifier.
    model, clf_meta = clf.load_classifier(classifier_path)
    probs = clf.predict_proba(model, generated)
    real_probs = clf.predict_proba(model, real.test)
    values[mk.COND_ACC] = float((probs.argmax(1) == gen_labels).mean())
    values[mk.COND_CONF] = float(probs[np.arange(len(gen_labels)), gen_labels].mean())
    values[mk.REAL_ACC] = float((real_probs.argmax(1) == real.test_labels).mean())
    for i, c in enumerate(classes):
        gm, tm = gen_labels == i, real.test_labels == i
        if gm.any():
            values[mk.per_class(mk.COND_ACC, c)] = float((probs[gm].argmax(1) == i).mean())
            values[mk.per_class(mk.COND_CONF, c)] = float(probs[gm, i].mean())
        if tm.any():
            values[mk.per_class(mk.REAL_ACC, c)] = float((real_probs[tm].argmax(1) == i).mean())
    steps.update()

    # TSTR next to TRTR: the same recipe, the same number of images per class, the same seed.
    n_per = {i: int((gen_labels == i).sum()) for i in range(len(classes))}
    pick = np.concatenate([rng.permutation(np.flatnonzero(real.train_labels == i))[:n] for i, n in n_per.items()])
    recipe = dict(num_classes=len(classes), steps=cfg.tstr_steps, width=cfg.classifier_width, work_resolution=cfg.classifier_resolution,
                  lr=cfg.classifier_lr, batch_size=cfg.classifier_batch, seed=cfg.seed)
    tstr = clf.train_classifier(generated, gen_labels, **recipe)
    trtr = clf.train_classifier(real.train[pick], real.train_labels[pick], **recipe)
    for key, model_ in ((mk.TSTR_ACC, tstr), (mk.TRTR_ACC, trtr)):
        pred = clf.predict_proba(model_, real.test).argmax(1)
        values[key] = float((pred == real.test_labels).mean())
        for i, c in enumerate(classes):
            tm = real.test_labels == i
            if tm.any():
                values[mk.per_class(key, c)] = float((pred[tm] == i).mean())
    steps.update()

    # Memorisation: nearest training image, pixel and feature space, against test-to-train.
    q = cfg.memorisation_percentile
    px_train = _pixels(real.train)
    d_gen_px, _ = nearest(_pixels(generated), px_train)
    d_test_px, _ = nearest(_pixels(real.test), px_train)
    d_gen_ft, _ = nearest(gen_feats, real_feats["train"])
    d_test_ft, _ = nearest(real_feats["test"], real_feats["train"])
    thr_px, thr_ft = float(np.percentile(d_test_px, q)), float(np.percentile(d_test_ft, q))
    close_px, close_ft = d_gen_px <= thr_px, d_gen_ft <= thr_ft
    values[mk.MEMORISATION_SHARE] = float(close_px.mean())
    values[mk.MEMORISATION_SHARE_FEATURE] = float(close_ft.mean())
    values[mk.NN_TRAIN_DIST_PIXEL] = float(np.median(d_gen_px))
    values[mk.NN_TRAIN_DIST_PIXEL + mk.REF_SUFFIX] = float(np.median(d_test_px))
    values[mk.NN_TRAIN_DIST_FEATURE] = float(np.median(d_gen_ft))
    values[mk.NN_TRAIN_DIST_FEATURE + mk.REF_SUFFIX] = float(np.median(d_test_ft))
    for i, c in enumerate(classes):
        gm = gen_labels == i
        if gm.any():
            values[mk.per_class(mk.MEMORISATION_SHARE, c)] = float(close_px[gm].mean())
            values[mk.per_class(mk.MEMORISATION_SHARE_FEATURE, c)] = float(close_ft[gm].mean())
    steps.update()
    steps.close()

    protocol = {
        "seed": cfg.seed,
        "classes": classes,
        "img_resolution": real.img_resolution,
        "img_channels": real.img_channels,
        "samples": {"generated": {c: int((gen_labels == i).sum()) for i, c in enumerate(classes)},
                    "train": int(len(real.train)), "val": int(len(real.val)), "test": int(len(real.test))},
        "reference": "real validation split vs real test split (suffix _ref)",
        "real_set": "test split (generated vs test; per condition against the same condition)",
        "resize": ("none for domain metrics, SSIM and memorisation: real images are the dataset level at the "
                   "generator's resolution; Inception: grayscale repeated to 3 channels, torch-fidelity "
                   "TF1-compatible bilinear resize to 299x299"),
        "domain_extractor": {"name": register, "layer": clf.FEATURE_LAYER, "weights_sha256": clf_sha,
                             "feature_dim": int(gen_feats.shape[1]), "features_cached": domain_cached,
                             "trained_on": "real train split", "data_identity": clf_meta.get("data_identity", "")},
        "inception_extractor": ({"name": INCEPTION_EXTRACTOR, "layer": INCEPTION_LAYER, "weights_path": str(inc_path),
                                 "weights_sha256": inc_sha, "sha256_matches_file_name": inc_sha.startswith(INCEPTION_SHA256_PREFIX)}
                                if inc_path else {"available": False, "reason": inc_reason}),
        "kid": {"subsets": cfg.kid_subsets, "subset_size": cfg.kid_subset_size, "kernel": "poly3"},
        "prc": {"neighborhood": cfg.prc_neighborhood, "space": "domain"},
        "ms_ssim": {"window": win, "scales": scales, "sigma": 1.5 * win / 11, "data_range": 2.0,
                    "weights": list(MS_SSIM_WEIGHTS[:scales]), "diversity_pairs": cfg.diversity_pairs},
        "ssim": {"window": win, "pairing": "nearest real test image of the same condition (pixel L2)"},
        "tstr": {**{k: v for k, v in recipe.items() if k != "num_classes"}, "trtr_images_per_class": n_per and list(n_per.values())},
        "memorisation": {"percentile": q, "threshold_pixel": thr_px, "threshold_feature": thr_ft,
                         "pixel_distance": "RMS over pixels in [-1, 1]", "feature_distance": "L2, domain features"},
        "data_identity": real.identity,
    }
    return MetricsResult(values=values, unavailable=unavailable, protocol=protocol)


def describe(values: dict[str, float], classes: Sequence[str]) -> str:
    """A short human-readable table of the main metrics (for logs)."""
    keys = (mk.FID_DOMAIN, mk.KID_DOMAIN, mk.PRECISION, mk.RECALL, mk.COND_ACC, mk.MS_SSIM_DIVERSITY, mk.MEMORISATION_SHARE)
    rows = [f"{'condition':<24}" + "".join(f"{k:>20}" for k in keys)]
    for c in [None, *classes]:
        name = "overall" if c is None else c
        cells = []
        for k in keys:
            v = values.get(k if c is None else mk.per_class(k, c))
            cells.append(f"{v:>20.4g}" if v is not None else f"{'-':>20}")
        rows.append(f"{name:<24}" + "".join(cells))
    return "\n".join(rows)


def json_safe(values: dict[str, float]) -> dict[str, float | None]:
    """NaN/inf -> None, so the JSON stays valid."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in values.items()}


__all__ = ["RealSplits", "MetricsResult", "compute_metrics", "real_splits", "dataset_identity",
           "inception_weights_path", "ssim", "ms_ssim", "ms_ssim_plan", "nearest", "fid_from_features",
           "kid_from_features", "precision_recall", "describe", "json_safe"]
