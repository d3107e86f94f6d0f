import subprocess
import sys

from radsynth.cli import COMMANDS, main


def test_every_subcommand_has_help(root):
    out = subprocess.run([sys.executable, "-m", "radsynth.cli", "--help"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
        sub = subprocess.run([sys.executable, "-m", "radsynth.cli", name, "--help"], capture_output=True, text=True, cwd=root)
        assert sub.returncode == 0, sub.stderr
        assert "--profile" in sub.stdout


def test_config_error_is_one_line_not_a_traceback(root, tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: a\nprofiles: {a: {}}\ndata: {colour: 1}\n")
    name = next(iter(COMMANDS))
    assert main([name, "--params", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.colour" in err and "Traceback" not in err


def _documented_overrides(root) -> list[tuple[str, str]]:
    """``(where, key=value)`` for every override example in --help texts, docs and error messages."""
    import importlib
    import re

    from radsynth.cli import build_parser

    pattern = re.compile(r"(?:--set|-S|key=value, e\.g\.)\s+`?([A-Za-z_][\w.]*=[^\s`\"')]+)")
    texts = {}
    parser, subparsers = build_parser()
    for name, (module, _) in COMMANDS.items():
        importlib.import_module(module).add_arguments(subparsers[name])
        texts[f"radsynth {name} --help"] = subparsers[name].format_help()
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "serving" / "web" / "README.md",
                 root / "dvc.yaml", root / "radsynth" / "config.py", root / "radsynth" / "cli.py",
                 root / "pipelines" / "workspace.py"]:
        texts[str(path.relative_to(root))] = path.read_text()
    found = []
    for where, text in texts.items():
        for example in pattern.findall(text):
            key = example.split("=", 1)[0]
            if key.lower() in ("key", "key.sub") or example.endswith("..."):
                continue                                              # placeholders, not examples
            found.append((where, example.rstrip(".,;:")))
    return found


def test_every_documented_override_is_a_key_the_checker_accepts(root):
    from radsynth.config import ConfigError, load_params, parse_override

    examples = _documented_overrides(root)
    assert any(w == "radsynth train --help" for w, _ in examples) and len(examples) >= 8, examples
    rejected = []
    for where, example in examples:
        try:
            load_params(root / "params.yaml", profile="tiny", overrides=dict([parse_override(example)]))
        except ConfigError as exc:
            rejected.append(f"{where}: {example}: {exc}")
    assert not rejected, "\n".join(rejected)
    # the control: the example the help used to give is refused
    try:
        load_params(root / "params.yaml", overrides=dict([parse_override("train.seed=3")]))
    except ConfigError as exc:
        assert "train.seed" in str(exc)
    else:
        raise AssertionError("train.seed=3 was accepted")
