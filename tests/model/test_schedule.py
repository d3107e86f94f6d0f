"""The torch-free schedule, recipes, EMA half-life, lazy penalty and Adam reset options."""

import json
import math
import subprocess
import sys

import pytest

from model.schedule import TrainingError, build_schedule, check_recipe_values, ema_beta, lr_scale, stage_resolutions
from radsynth.config import ConfigError, TrainConfig, load_params


def test_schedule_module_and_the_pipeline_stage_list_import_no_torch(root):
    code = ("import sys; import model.schedule as s; from radsynth.config import load_params; "
            "p = load_params(profile='gpu'); from pipelines.radsynth_pipeline import stage_resolutions; "
            "print(s.stage_resolutions(p.train, p.data.img_resolution, p.model.variant), stage_resolutions(p)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[4, 8, 16, 32, 64, 128] [4, 8, 16, 32, 64, 128]"
    assert out[1] == "False"


def test_ema_half_life_is_in_kimg_of_progress_and_ramps_up():
    cfg = TrainConfig(ema_kimg=10.0, ema_rampup=0.0)
    # after 10 kimg of iterations of 80 images (125 G steps) the old average weighs one half
    beta = ema_beta(cfg, images_per_iter=80, kimg_done=50.0)
    assert beta ** (10_000 / 80) == pytest.approx(0.5)
    assert ema_beta(cfg, 16, 50.0) ** (10_000 / 16) == pytest.approx(0.5)      # same half-life at another batch / n_critic
    ramp = TrainConfig(ema_kimg=10.0, ema_rampup=0.05)
    assert ema_beta(ramp, 80, 100.0) ** (5_000 / 80) == pytest.approx(0.5)    # early: 0.05 x 100 kimg = 5 kimg half-life
    assert ema_beta(ramp, 80, 1000.0) == pytest.approx(beta)                  # later: the configured 10 kimg
    assert ema_beta(TrainConfig(ema_kimg=0.0), 80, 5.0) == 0.0                # G_ema = G


def test_lr_ramp_down_is_a_half_cosine_over_the_schedules_last_kimg():
    off = TrainConfig()
    assert lr_scale(off, 41.9, 42.0) == 1.0
    cfg = TrainConfig(lr_rampdown_kimg=4.0, lr_rampdown_floor=0.1)
    assert lr_scale(cfg, 10.0, 42.0) == 1.0 and lr_scale(cfg, 38.0, 42.0) == 1.0     # before the window
    assert lr_scale(cfg, 40.0, 42.0) == pytest.approx(0.55)                           # half-way: (1 + floor) / 2
    assert lr_scale(cfg, 39.0, 42.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_scale(cfg, 42.0, 42.0) == pytest.approx(0.1) and lr_scale(cfg, 50.0, 42.0) == pytest.approx(0.1)
    for bad in ({"lr_rampdown_kimg": -1.0}, {"lr_rampdown_floor": 1.5}):
        with pytest.raises(TrainingError, match="lr_rampdown"):
            check_recipe_values(TrainConfig(**bad))


def test_recipes_layer_between_base_and_profile_and_set_wins(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "profile": "p", "train": {"recipe": "child", "lr_g": 1.0e-4, "n_critic": 5, "batch_size": 32},
        "recipes": {"parent": {"model": {"z_dim": 7}, "train": {"lr_g": 2.0e-3, "n_critic": 1, "beta1": 0.0}},
                    "child": {"extends": "parent", "about": "x", "train": {"gp_interval": 4}},
                    "loop": {"extends": "loop"}},
        "profiles": {"p": {"train": {"n_critic": 2}}, "q": {"train": {"recipe": ""}}},
    }))
    p = load_params(params)
    assert (p.train.recipe, p.train.lr_g, p.train.n_critic, p.train.beta1, p.train.gp_interval, p.model.z_dim) == \
        ("child", 2.0e-3, 2, 0.0, 4, 7)                # recipe over base; the profile's n_critic over the recipe
    p = load_params(params, overrides={"train.lr_g": 5.0e-4, "train.recipe": "parent"})
    assert (p.train.lr_g, p.train.gp_interval, p.train.beta1) == (5.0e-4, 1, 0.0)
    p = load_params(params, profile="q")
    assert (p.train.recipe, p.train.lr_g, p.train.n_critic, p.model.z_dim) == ("", 1.0e-4, 5, 128)
    with pytest.raises(ConfigError, match="'nope' is not a recipe"):
        load_params(params, overrides={"train.recipe": "nope"})
    with pytest.raises(ConfigError, match="loops"):
        load_params(params, overrides={"train.recipe": "loop"})


def test_the_seeds_recommended_baseline_stays_available_by_name(root):
    p = load_params(root / "params.yaml", profile="cpu", overrides={"train.recipe": "wgan-gp-paper"})
    t = p.train
    assert (t.lr_g, t.lr_d, t.beta1, t.beta2, t.n_critic, t.gp_lambda, t.gp_interval, t.augment) == \
        (1e-4, 1e-4, 0.5, 0.9, 5, 10.0, 1, ())
    assert p.model.variant == "pgcgan-sa"
    base = load_params(root / "params.yaml", profile="cpu", overrides={"train.recipe": "cpu-dcgan"})
    assert base.model.variant == "dcgan" and stage_resolutions(base.train, 64, "dcgan") == [64]


def test_every_named_recipe_of_params_yaml_loads_and_builds_a_schedule(root):
    import yaml

    names = yaml.safe_load((root / "params.yaml").read_text())["recipes"]
    for profile in ("cpu", "gpu"):
        for name in names:
            p = load_params(root / "params.yaml", profile=profile, overrides={"train.recipe": name})
            assert build_schedule(p.train, p.data.img_resolution, p.model.variant == "pgcgan-sa")


def test_cpu_profile_trains_the_mission_model_on_every_core(root):
    p = load_params(root / "params.yaml", profile="cpu")
    assert p.model.variant == "pgcgan-sa" and p.train.threads == 0 and p.train.ranks == 2
    assert p.train.n_critic == 1 and (p.train.beta1, p.train.beta2) == (0.0, 0.99)
    assert math.isclose(p.train.lr_g, p.train.lr_d)
    assert p.train.class_ce > 0 and p.train.mode_seeking > 0 and p.model.class_modulation   # docs/benchmarks.md: issue 13


def test_long_cpu_recipes_double_the_budget_and_add_only_the_half_twin(root):
    """`cpu-pgcgan-sa-long` is `cpu-pgcgan-sa` at twice the kimg with the twin class head at half
    share, nothing else (what `benchmarks/quality.py --tag tac05` trained on five salts,
    docs/benchmarks.md); `cpu-dcgan-long` is the baseline at twice its kimg."""
    from model.trainer import arithmetic

    def load(recipe, **extra):
        return load_params(root / "params.yaml", profile="cpu", overrides={"train.recipe": recipe, **extra})

    def total(p):
        return sum(st.kimg for st in build_schedule(p.train, 64, p.model.variant == "pgcgan-sa"))

    long, short = load("cpu-pgcgan-sa-long"), load("cpu-pgcgan-sa")
    measured = load("cpu-pgcgan-sa", **{"train.kimg_per_resolution": {4: [0, 16], 8: [8, 16], 16: [8, 12], 32: [6, 8], 64: [4, 6]},
                                        "model.d_twin_classifier": True, "train.class_ce_twin_g": 0.5})
    assert arithmetic(long.to_dict()) == arithmetic(measured.to_dict())
    assert math.isclose(total(long), 84.0) and math.isclose(total(long), 2 * total(short), rel_tol=1e-3)
    a, b = arithmetic(long.to_dict()), arithmetic(short.to_dict())
    changed = {f"{sec}.{k}" for sec in ("model", "train") for k, v in a[sec].items() if b[sec][k] != v}
    assert changed == {"train.kimg_per_resolution", "train.class_ce_twin_g", "model.d_twin_classifier"}
    assert not short.model.d_twin_classifier      # the demo's 42 kimg keeps no twin (docs/benchmarks.md, session 12)
    dl, ds = load("cpu-dcgan-long"), load("cpu-dcgan")
    assert dl.model.variant == "dcgan" and math.isclose(total(dl), 84.0) and math.isclose(total(dl), 2 * total(ds), rel_tol=1e-3)
