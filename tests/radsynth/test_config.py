from pathlib import Path

import pytest
import yaml

from radsynth.config import ConfigError, Params, load_params, parse_override


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_project_params_load_for_every_profile(root):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert set(raw["profiles"]) >= {"tiny", "cpu", "gpu"}
    for name in raw["profiles"]:
        params = load_params(root / "params.yaml", profile=name)
        assert isinstance(params, Params)
        assert params.profile == name


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "profile: a\ndata:\n  img_resolutoin: 64\nprofiles: {a: {}}\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "data.img_resolutoin" in msg and str(path) in msg and "data.img_resolution" in msg


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "profile: a\ndata:\n  img_resolution: '64'\nprofiles: {a: {}}\n")
    with pytest.raises(ConfigError, match=r"data\.img_resolution must be an integer"):
        load_params(path)
    path = write(tmp_path, "profile: a\ndata:\n  hflip: 1\nprofiles: {a: {}}\n")
    with pytest.raises(ConfigError, match=r"data\.hflip must be true or false"):
        load_params(path)


def test_unknown_key_inside_profile_is_caught(tmp_path):
    path = write(tmp_path, "profile: a\nprofiles: {a: {data: {bogus: 1}}}\n")
    with pytest.raises(ConfigError, match=r"data\.bogus"):
        load_params(path)


def test_profile_overlay_and_overrides(tmp_path):
    path = write(tmp_path, "profile: a\nseed: 1\ndata: {img_resolution: 128}\nprofiles: {a: {data: {img_resolution: 32}}, b: {}}\n")
    assert load_params(path).data.img_resolution == 32
    assert load_params(path, profile="b").data.img_resolution == 128
    assert load_params(path, profile="b", overrides={"seed": 9}).seed == 9
    with pytest.raises(ConfigError, match="unknown profile 'zzz'"):
        load_params(path, profile="zzz")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "a: [1,\n"))


def test_digest_changes_with_values(tmp_path):
    path = write(tmp_path, "profile: a\nprofiles: {a: {}}\n")
    assert load_params(path).digest() == load_params(path).digest()
    assert load_params(path).digest() != load_params(path, overrides={"seed": 2}).digest()


def test_parse_override():
    assert parse_override("data.img_resolution=64") == ("data.img_resolution", 64)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_scientific_notation_is_a_number_for_float_fields(tmp_path, root):
    # YAML 1.1 (PyYAML) reads 2e-3 as the string "2e-3"; a float field takes it as the number.
    assert parse_override("train.lr_g=2e-3") == ("train.lr_g", "2e-3")
    params = load_params(root / "params.yaml", profile="tiny", overrides=dict([parse_override("train.lr_g=2e-3"),
                                                                                parse_override("train.lr_d=1E-4")]))
    assert params.train.lr_g == 0.002 and params.train.lr_d == 1e-4 and isinstance(params.train.lr_g, float)
    path = write(tmp_path, "profile: a\ntrain: {lr_g: 5e-4, kimg_per_resolution: {8: [1e1, .5]}}\nprofiles: {a: {}}\n")
    loaded = load_params(path)
    assert loaded.train.lr_g == 5e-4 and loaded.train.kimg_per_resolution == {8: (10.0, 0.5)}
    assert load_params(path).digest() == load_params(path, overrides={"train.lr_g": 0.0005}).digest()
    # still strict: words, nan and numbers for integer or string fields are refused
    for bad in ("fast", "nan", "inf", "0x10", "1e-3e2"):
        with pytest.raises(ConfigError, match=r"train\.lr_g must be a number"):
            load_params(path, overrides={"train.lr_g": bad})
    with pytest.raises(ConfigError, match=r"train\.n_critic must be an integer"):
        load_params(path, overrides={"train.n_critic": "5e0"})
    assert load_params(path, overrides={"model.variant": "2e-3"}).model.variant == "2e-3"


@pytest.mark.parametrize("old, new", [("serve.model_name", "registry.model_name"), ("web.model_name", "registry.model_name"),
                                      ("web.model_alias", "registry.champion_alias"),
                                      ("web.encoder_name", "registry.encoder_name"),
                                      ("web.classifier_name", "registry.classifier_name"),
                                      ("synthesize.alias", "registry.champion_alias"),
                                      ("web.encoder_steps", "encoder.steps"), ("web.encoder_opset", "encoder.opset")])
def test_a_moved_key_says_where_it_went(root, old, new):
    with pytest.raises(ConfigError, match=rf"{old} moved to {new}"):
        load_params(root / "params.yaml", profile="tiny", overrides={old: "x"})


def test_names_and_aliases_are_written_once_in_registry(root):
    """serve and web take the generator's name and the champion alias from registry: one rename reaches both."""
    params = load_params(root / "params.yaml", profile="tiny", overrides={"registry.model_name": "radsynth-brain",
                                                                          "registry.champion_alias": "prod"})
    assert params.serve.models == ("radsynth-brain",) and params.serve.aliases == ("prod",)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    names = {"radsynth-generator", "radsynth-classifier", "radsynth-encoder", "champion"}
    for section, body in raw.items():
        if section not in ("registry", "profiles") and isinstance(body, dict):
            assert not names & {str(v) for v in body.values() if not isinstance(v, (dict, list))}, section
            assert not names & {str(x) for v in body.values() if isinstance(v, list) for x in v}, section
