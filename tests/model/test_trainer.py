"""Trainer: schedule, resume equivalence, stage-wise invocation, the baseline variant."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from components.train import train
from model.checkpoint import load_generator, load_state
from model.trainer import RESOLUTION, TrainingError, build_schedule
from radsynth.config import TrainConfig, load_params
from radsynth.dataset import to_float
from tests.model.datasets import make_dataset

OFF = {"train.tracking": False, "train.progress": False}


def tiny(root, **overrides):
    return load_params(root / "params.yaml", profile="tiny", overrides={**OFF, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "dataset")


class Killed(Exception):
    pass


def kill_at(global_iteration):
    count = {"n": 0}

    def hook(trainer):
        count["n"] += 1
        if count["n"] == global_iteration:
            raise Killed

    return hook


def weights(path):
    state, info = load_state(path)
    return state, info


def assert_same_state(a, b):
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
    for opt in ("opt_G", "opt_D"):
        for i, s in a[opt]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, b[opt]["state"][i][k]), f"{opt}.{i}.{k}"
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))


def test_schedule_iterations_alpha_and_baseline_budget():
    cfg = TrainConfig(start_resolution=8, kimg_fade=0.4, kimg_stabilize=0.8, batch_size=16, batch_per_resolution={16: 8}, n_critic=5)
    prog = build_schedule(cfg, 16, progressive=True)
    assert [(s.resolution, s.batch, s.fade_iters, s.stabilize_iters) for s in prog] == [(8, 16, 0, 10), (16, 8, 10, 20)]
    assert [prog[1].alpha(i) for i in (0, 5, 9, 10, 29)] == [0.0, 0.5, 0.9, 1.0, 1.0]
    assert prog[0].alpha(0) == 1.0
    base = build_schedule(cfg, 16, progressive=False)
    assert len(base) == 1 and base[0].resolution == 16 and base[0].fade_iters == 0
    assert base[0].kimg == pytest.approx(0.8 + 0.4 + 0.8)           # same budget as the progressive run
    with pytest.raises(TrainingError, match="start_resolution"):
        build_schedule(TrainConfig(start_resolution=32), 16, progressive=True)


def test_per_resolution_kimg_overrides_the_defaults_and_the_baseline_budget_follows():
    cfg = TrainConfig(start_resolution=4, kimg_fade=0.4, kimg_stabilize=0.8, batch_size=16, batch_per_resolution={}, n_critic=5,
                      kimg_per_resolution={4: (0.0, 1.6), 16: (0.8, 0.0)})
    prog = build_schedule(cfg, 16, progressive=True)
    assert [(s.resolution, s.fade_iters, s.stabilize_iters) for s in prog] == [(4, 0, 20), (8, 5, 10), (16, 10, 0)]
    base = build_schedule(cfg, 16, progressive=False)
    assert base[0].kimg == pytest.approx(1.6 + (0.4 + 0.8) + 0.8)
    with pytest.raises(TrainingError, match=r"kimg_per_resolution\.8 must be \[fade_kimg, stabilize_kimg\]"):
        build_schedule(TrainConfig(kimg_per_resolution={8: (1.0,)}), 16, progressive=True)
    with pytest.raises(TrainingError, match="first stage"):
        build_schedule(TrainConfig(kimg_per_resolution={4: (0.0, 0.0)}), 16, progressive=True)


def test_real_batch_scaling_matches_to_float(root, dataset, tmp_path):
    from model.trainer import Trainer

    tr = Trainer(tiny(root), dataset, tmp_path)
    idx = torch.tensor([0, 3, 5])
    st = tr.schedule[1]
    expected = to_float(dataset.images(16, split="train")[[0, 3, 5]])
    assert np.array_equal(tr._real_batch(idx, st, 1.0).numpy(), expected)


@pytest.fixture(scope="module")
def uninterrupted(root, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # bitwise equality needs the same thread count as the resumed runs
    try:
        summary = train(tiny(root), dataset.root, out)
    finally:
        torch.set_num_threads(before)
    assert summary["complete"] and summary["kimg"] == pytest.approx(0.4 + 0.8)
    return out, summary


def test_kill_and_resume_equals_uninterrupted(root, dataset, tmp_path, uninterrupted):
    params = tiny(root)
    full_dir, full = uninterrupted
    # checkpoints every 2 iterations. Killed twice, each time between checkpoints: at stage 8
    # iteration 3 (resume from 2), then, counting from that resume, at stage 16 iteration 5
    # (resume from 4 of stage 16)
    for it in (3, 8):
        with pytest.raises(Killed):
            train(params, dataset.root, tmp_path / "killed", on_iteration=kill_at(it))
    resumed = train(params, dataset.root, tmp_path / "killed")
    a, info_a = weights(full_dir / "stage_16" / "checkpoint.json")
    b, info_b = weights(tmp_path / "killed" / "stage_16" / "checkpoint.json")
    assert info_a["complete"] and info_b["complete"] and info_a["g_steps"] == info_b["g_steps"] == 15
    assert_same_state(a, b)
    assert resumed["rank_G_ema_sha256"] == full["rank_G_ema_sha256"]
    assert [h[RESOLUTION] for h in info_a["history"]] == [h[RESOLUTION] for h in info_b["history"]]
    G_full, _ = load_generator(full_dir / "G_ema.safetensors")
    G_res, meta = load_generator(tmp_path / "killed" / "G_ema.safetensors")
    assert meta["classes"] == ["A", "B", "C"] and meta["data_md5"] == "synthetic" and meta["img_resolution"] == 16
    for (k, x), (_, y) in zip(G_full.state_dict().items(), G_res.state_dict().items()):
        assert torch.equal(x, y), k
    from model.registry import build_networks

    G0, _ = build_networks(params.model, 3, 1, 16, seed=params.seed)       # training moved the weights
    assert not torch.equal(G0.state_dict()["to_rgb.16.weight"], G_res.state_dict()["to_rgb.16.weight"])


def test_sigkill_of_a_training_process_then_resume_equals_uninterrupted(root, dataset, tmp_path, uninterrupted):
    """A real kill (SIGKILL, no clean-up) of `radsynth train` once stage 16 has checkpointed."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "radsynth.cli", "train", "--profile", "tiny", "--set", "train.tracking=false",
           "--dataset", str(dataset.root), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not (out / "stage_16" / "checkpoint.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "stage_8" / "checkpoint.json").exists()
    resumed = train(tiny(root), dataset.root, out)
    assert resumed["complete"] and resumed["rank_G_ema_sha256"] == uninterrupted[1]["rank_G_ema_sha256"]


def test_stagewise_invocations_equal_one_call_and_need_the_previous_stage(root, dataset, tmp_path):
    params = tiny(root)
    with pytest.raises(TrainingError, match="run `radsynth train --stage 8` first"):
        train(params, dataset.root, tmp_path / "staged", stage=16)
    s8 = train(params, dataset.root, tmp_path / "staged", stage=8)
    assert not s8["complete"] and "G_ema" not in s8 and (tmp_path / "staged" / "stage_8" / "grid_8.png").is_file()
    s16 = train(params, dataset.root, tmp_path / "staged", stage=16)
    assert s16["complete"] and (tmp_path / "staged" / "G_ema.safetensors").is_file()
    whole = train(params, dataset.root, tmp_path / "whole")
    assert s16["rank_G_ema_sha256"] == whole["rank_G_ema_sha256"]
    again = train(params, dataset.root, tmp_path / "whole")                     # finished: nothing retrained
    assert [s.get("skipped") for s in again["stages"]] == ["already complete"] * 2
    assert again["rank_G_ema_sha256"] == whole["rank_G_ema_sha256"]
    with pytest.raises(TrainingError, match=r"different config \(train\.lr_g\)"):
        train(tiny(root, **{"train.lr_g": 3e-4}), dataset.root, tmp_path / "whole")
    with pytest.raises(TrainingError, match="not in this run's schedule"):
        train(params, dataset.root, tmp_path / "whole", stage=32)


def test_a_checkpoint_from_before_a_key_existed_resumes_when_that_key_is_at_its_default(root, dataset, tmp_path):
    """Older code hashed fewer keys: its digest differs, and its saved params lack the new key.
    Resume compares the keys themselves, reading a missing one at its default."""
    params = tiny(root)
    out = tmp_path / "old"
    train(params, dataset.root, out, stage=8)
    sidecar = out / "stage_8" / "checkpoint.json"
    doc = json.loads(sidecar.read_text())
    del doc["info"]["params"]["model"]["class_modulation"]             # as a checkpoint written before the option
    doc["info"]["config_digest"] = "0" * 16
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(TrainingError, match=r"different config \(model\.class_modulation\)"):
        train(tiny(root, **{"model.class_modulation": True}), dataset.root, out, stage=16)
    resumed = train(params, dataset.root, out, stage=16)
    assert resumed["complete"]
    assert resumed["rank_G_ema_sha256"] == train(params, dataset.root, tmp_path / "whole")["rank_G_ema_sha256"]


def test_switching_variant_trains_the_baseline_through_the_same_entry_point(root, dataset, tmp_path):
    params = tiny(root, **{"model.variant": "dcgan"})
    out = train(params, dataset.root, tmp_path / "dcgan")
    assert out["variant"] == "dcgan" and out["complete"]
    assert [s["resolution"] for s in out["schedule"]] == [16]
    assert out["kimg"] == pytest.approx(1.2, abs=0.1)                  # same budget as pgcgan-sa's 1.2 kimg
    G, meta = load_generator(tmp_path / "dcgan" / "G_ema.safetensors")
    assert meta["variant"] == "dcgan" and type(G).__name__ == "DCGANGenerator"
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 0])
    x = G(z, c)
    assert x.shape == (4, 1, 16, 16) and x.abs().max() <= 1
    from model.registry import build_networks

    G0, _ = build_networks(params.model, 3, 1, 16, seed=params.seed)
    assert not torch.equal(G0.to_rgb.weight, G.to_rgb.weight)           # it trained


def test_missing_levels_is_a_clear_error(root, tmp_path):
    ds = make_dataset(tmp_path / "ds8", res=8)
    with pytest.raises(TrainingError, match="lacks levels"):
        train(tiny(root), ds.root, tmp_path / "out")


@pytest.mark.parametrize("balanced, expected_share", [(False, (0.9, 0.05, 0.05)), (True, (1 / 3, 1 / 3, 1 / 3))])
def test_class_draws_follow_the_data_or_are_balanced(root, tmp_path, balanced, expected_share):
    from model.trainer import Trainer
    from radsynth.dataset import save_dataset

    labels = [0] * 36 + [1] * 2 + [2] * 2                       # a 90/5/5 imbalanced training split
    rng = np.random.default_rng(0)
    levels = {r: rng.integers(0, 256, (40, 1, r, r), dtype=np.uint8) for r in (4, 8, 16)}
    ds = save_dataset(tmp_path / "ds", levels, [f"p{i}" for i in range(40)], labels, ["train"] * 40, ["A", "B", "C"])
    tr = Trainer(tiny(root, **{"train.balanced_classes": balanced}), ds, tmp_path / "out")
    idx, _, _ = tr._draw(6000)
    share = np.bincount(tr.labels[idx].numpy(), minlength=3) / 6000
    np.testing.assert_allclose(share, expected_share, atol=0.03)
    assert set(idx[tr.labels[idx] == 1].tolist()) == {36, 37}   # draws stay inside their class


def test_lazy_gradient_penalty_runs_every_kth_critic_step_weighted_by_k(root, dataset, tmp_path):
    from model.losses import critic_loss
    from model.trainer import Trainer

    tr = Trainer(tiny(root, **{"train.gp_interval": 4, "train.gp_lambda": 10.0}), dataset, tmp_path)
    assert [tr.gp_weight(s) for s in range(9)] == [40.0, 0, 0, 0, 40.0, 0, 0, 0, 40.0]
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1, torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    c, u = torch.tensor([0, 1, 2, 0]), torch.rand(4, 1, 1, 1, generator=g)
    lazy, parts = critic_loss(tr.D, real, fake, c, u, tr.gp_weight(4), 1e-3)
    skipped, parts0 = critic_loss(tr.D, real, fake, c, u, tr.gp_weight(5), 1e-3)
    torch.testing.assert_close(lazy - skipped, 40.0 * parts["gp"])         # k * lambda * penalty, on the lazy step only
    assert "gp" not in parts0
    every_step = Trainer(tiny(root), dataset, tmp_path / "b")
    assert [every_step.gp_weight(s) for s in range(3)] == [10.0, 10.0, 10.0]


@pytest.mark.parametrize("reset", [True, False])
def test_adam_state_reset_at_a_new_resolution_is_an_option(root, dataset, tmp_path, reset):
    from model.trainer import Trainer

    tr = Trainer(tiny(root, **{"train.reset_optimizers": reset}), dataset, tmp_path)
    tr._prepare_stage(0, resume=False)
    tr.train_stage(0)
    steps_8 = {int(s["step"]) for s in tr.opt_D.state.values()}
    assert steps_8 == {tr.schedule[0].total_iters * tr.cfg.n_critic}
    tr._prepare_stage(1, resume=False)
    fresh = len(tr.opt_D.state) == 0 and len(tr.opt_G.state) == 0
    assert fresh == reset
    tr._iteration(tr.schedule[1], 0.5)
    steps = {int(s["step"]) for s in tr.opt_G.state.values()}
    assert steps == ({1} if reset else {1, tr.schedule[0].total_iters + 1})   # new stage-16 layers start at 1 either way


def test_augmented_lazy_recipe_trains_resumes_bitwise_and_writes_history(root, dataset, tmp_path):
    """The cpu-style recipe (n_critic 1, lazy penalty, augmentation, EMA ramp, Adam reset) on the tiny model."""
    over = {"train.n_critic": 1, "train.beta1": 0.0, "train.beta2": 0.99, "train.lr_g": 1e-3, "train.lr_d": 1e-3,
            "train.gp_interval": 4, "train.augment": ["translation", "cutout", "brightness", "contrast"],
            "train.augment_p": 0.5, "train.augment_target": 0.6, "train.augment_kimg": 1.0, "train.augment_interval": 2,
            "train.ema_kimg": 0.5, "train.ema_rampup": 0.1, "train.reset_optimizers": True, "train.checkpoint_kimg": 0.128}
    params = tiny(root, **over)
    full = train(params, dataset.root, tmp_path / "full")
    with pytest.raises(Killed):
        train(params, dataset.root, tmp_path / "killed", on_iteration=kill_at(70))
    resumed = train(params, dataset.root, tmp_path / "killed")
    assert full["complete"] and resumed["rank_G_ema_sha256"] == full["rank_G_ema_sha256"]
    lines = (tmp_path / "full" / "history.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[0] == "kimg" and "train/augment_p" in header
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    kimg = [float(r["kimg"]) for r in rows]
    assert kimg == sorted(kimg) and kimg[-1] == pytest.approx(full["kimg"])
    p = [float(r["train/augment_p"]) for r in rows]
    assert p[0] != p[-1] and all(0.0 <= v <= 1.0 for v in p)           # the adaptive probability moved
    assert any(r["train/gradient_penalty"] for r in rows)


def test_ema_probes_are_the_averages_other_half_lives_give_and_survive_a_resume(root, dataset, tmp_path, uninterrupted):
    """train.ema_probes: one run, several G averages; the recipe's own half-life reproduces G_ema
    bitwise, half-life 0 is G itself, training is unchanged, and a killed run resumes them exactly."""
    from model.trainer import ema_probe_path

    full_dir, full = uninterrupted
    params = tiny(root, **{"train.ema_probes": [10.0, 0.0, 0.2]})     # tiny: ema_kimg 10, no ramp-up
    assert params.train.ema_kimg == 10.0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Killed):
            train(params, dataset.root, tmp_path / "run", on_iteration=kill_at(8))
        probed = train(params, dataset.root, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert probed["rank_G_ema_sha256"] == full["rank_G_ema_sha256"]          # the probes never touched training
    assert sorted(probed["ema_probes"]) == ["0", "0.2", "10"]
    ema, _ = load_generator(full_dir / "G_ema.safetensors")
    same, meta = load_generator(ema_probe_path(tmp_path / "run", 10.0))
    raw, _ = load_generator(ema_probe_path(tmp_path / "run", 0.0))
    short, _ = load_generator(ema_probe_path(tmp_path / "run", 0.2))
    assert meta["ema_kimg"] == 10.0 and meta["kimg"] == pytest.approx(full["kimg"])
    live = weights(full_dir / "stage_16" / "checkpoint.json")[0]["G"]
    key = "to_rgb.16.weight"
    for k, v in ema.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k
    for k, v in live.items():
        assert torch.equal(v, raw.state_dict()[k]), k
    g, e, s = live[key], ema.state_dict()[key], short.state_dict()[key]
    assert not torch.equal(s, g) and not torch.equal(s, e)
    assert (s - g).abs().sum() < (e - g).abs().sum()                         # a shorter half-life stays nearer G
    with pytest.raises(TrainingError, match="ema_probes"):
        train(tiny(root, **{"train.ema_probes": [1.0, 1.0]}), dataset.root, tmp_path / "bad")


def test_lr_ramp_down_sets_both_optimisers_from_the_schedules_progress_and_is_logged(root, dataset, tmp_path):
    import model.trainer as trainer_mod

    params = tiny(root, **{"train.lr_rampdown_kimg": 0.6, "train.lr_rampdown_floor": 0.25})
    seen = []

    def record(tr):
        seen.append((tr.kimg, tr.opt_G.param_groups[0]["lr"], tr.opt_D.param_groups[0]["lr"]))

    trainer_mod.train_networks(params, dataset, tmp_path, on_iteration=record)
    cfg = params.train
    total = sum(st.kimg for st in trainer_mod.build_schedule(cfg, 16, True))
    assert total > 0.6
    early = [s for s in seen if s[0] < total - 0.6 - 0.05]
    assert early and all(g == cfg.lr_g and d == cfg.lr_d for _, g, d in early)       # full lr before the window
    kimg, g, d = seen[-1]
    assert kimg > total - 0.1 and 0.25 * cfg.lr_g <= g < 0.3 * cfg.lr_g and d / cfg.lr_d == pytest.approx(g / cfg.lr_g)
    assert all(a[1] >= b[1] for a, b in zip(seen, seen[1:]))                          # never rises
    header, *rows = (tmp_path / trainer_mod.HISTORY_TSV).read_text().splitlines()
    col = header.split("\t").index(trainer_mod.LR_SCALE)
    scales = [float(r.split("\t")[col]) for r in rows]
    assert scales[0] == 1.0 and 0.25 <= scales[-1] < 0.5


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_mode_seeking_pairs_the_g_batch_by_class_and_adds_its_term_only_when_set(root, dataset, tmp_path, weight, monkeypatch):
    import model.trainer as trainer_mod

    tr = trainer_mod.Trainer(tiny(root, **{"train.mode_seeking": weight}), dataset, tmp_path)
    seen, terms = [], []
    forward, term = tr.G.forward, trainer_mod.mode_seeking_loss

    def spy(z, c):
        if torch.is_grad_enabled():          # the G step's call (the critic's fakes are drawn without grad)
            seen.append(c)
        return forward(z, c)

    def spy_term(fake, z, pairs):
        terms.append(pairs)
        return term(fake, z, pairs)

    tr.G.forward = spy
    monkeypatch.setattr(trainer_mod, "mode_seeking_loss", spy_term)
    st = tr.schedule[0]
    tr._iteration(st, 1.0)
    (c,) = seen
    h = st.batch // 2
    means = tr.stats.means()
    if weight:
        assert torch.equal(c[:h], c[h:2 * h]) and terms == [h]    # same-class pairs, one term over all of them
        assert means[trainer_mod.MODE_SEEKING] > 0                # logged on its own, apart from loss_G
    else:
        assert terms == []                                         # off: G's loss and draws as before
        assert trainer_mod.MODE_SEEKING not in means
    assert trainer_mod.LOSS_G in means
    assert all(torch.isfinite(p).all() for p in tr.G.parameters())


def _first_and_last_means(tr, st, iterations: int = 30, last: int = 10):
    """Train ``iterations`` steps at stage ``st``: the stats of the first step and the mean over the last ``last``."""
    first = None
    for i in range(iterations):
        tr._iteration(st, 1.0)
        if i == 0:
            first = tr.stats.means()
        if i == iterations - last - 1:
            tr.stats.reset()
    return first, tr.stats.means()


def test_class_cross_entropy_is_logged_for_both_nets_and_the_critic_learns_the_classes(root, dataset, tmp_path):
    import model.trainer as trainer_mod

    off = trainer_mod.Trainer(tiny(root), dataset, tmp_path / "off")
    off._iteration(off.schedule[0], 1.0)
    assert not {trainer_mod.CLASS_CE_REAL, trainer_mod.CLASS_CE_FAKE} & set(off.stats.means())
    tr = trainer_mod.Trainer(tiny(root, **{"train.class_ce": 1.0, "train.lr_d": 2.0e-3}), dataset, tmp_path / "on")
    st = tr.schedule[0]
    first, last = _first_and_last_means(tr, st)
    assert first[trainer_mod.CLASS_CE_REAL] == pytest.approx(math.log(3), abs=0.35)   # untrained: near chance
    assert last[trainer_mod.CLASS_CE_REAL] < 0.5 * first[trainer_mod.CLASS_CE_REAL]   # D classifies the reals
    assert math.isfinite(last[trainer_mod.CLASS_CE_FAKE])
    real = tr._real_batch(torch.arange(12), st, 1.0)
    _, logits = tr.D(real, tr.labels[:12], logits=True)
    assert (logits.argmax(1) == tr.labels[:12]).float().mean() >= 0.75


def test_twin_classifier_learns_the_fakes_classes_and_is_logged(root, dataset, tmp_path):
    import model.trainer as trainer_mod

    with pytest.raises(trainer_mod.TrainingError, match="class_ce"):
        trainer_mod.Trainer(tiny(root, **{"model.d_twin_classifier": True}), dataset, tmp_path / "no-ce")
    tr = trainer_mod.Trainer(tiny(root, **{"train.class_ce": 1.0, "train.lr_d": 2.0e-3, "model.d_twin_classifier": True}),
                             dataset, tmp_path / "twin")
    assert tr.twin
    st = tr.schedule[0]
    twin_before = tr.D.embed_twin.weight.detach().clone()
    first, last = _first_and_last_means(tr, st)
    assert first[trainer_mod.CLASS_CE_TWIN] == pytest.approx(math.log(3), abs=0.35)   # untrained: near chance
    assert math.isfinite(last[trainer_mod.CLASS_CE_TWIN]) and math.isfinite(last[trainer_mod.CLASS_CE_FAKE])
    assert not torch.equal(twin_before, tr.D.embed_twin.weight)                         # the twin head is trained
    assert last[trainer_mod.CLASS_CE_REAL] < 0.5 * first[trainer_mod.CLASS_CE_REAL]    # the real head still learns
    assert all(torch.isfinite(p).all() for p in tr.G.parameters())
    assert trainer_mod.CLASS_CE_TWIN in trainer_mod.HISTORY_COLUMNS
    for share in (-0.1, 1.5):
        with pytest.raises(trainer_mod.TrainingError, match="class_ce_twin_g"):
            trainer_mod.Trainer(tiny(root, **{"train.class_ce": 1.0, "model.d_twin_classifier": True,
                                              "train.class_ce_twin_g": share}), dataset, tmp_path / "bad")


def test_class_cross_entropy_refuses_a_critic_without_class_logits(root, dataset, tmp_path):
    import model.trainer as trainer_mod

    params = tiny(root, **{"train.class_ce": 1.0, "model.variant": "dcgan", "model.dcgan_conditioning": "concat"})
    with pytest.raises(trainer_mod.TrainingError, match="projection critic"):
        trainer_mod.Trainer(params, dataset, tmp_path)
