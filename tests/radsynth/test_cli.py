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
