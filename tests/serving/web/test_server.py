"""``radsynth web``: refuses a busy port clearly; the resolved config shows the web section."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from radsynth.config import load_params
from radsynth.errors import RadsynthError
from serving.web.server import serve

from .conftest import ROOT


def test_busy_port_is_a_clear_error_not_a_gunicorn_retry_loop():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RadsynthError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve(load_params(ROOT / "params.yaml", profile="tiny"), "127.0.0.1", port, 1)


def test_dry_run_prints_the_web_section():
    out = subprocess.run([sys.executable, "-m", "radsynth.cli", "web", "--profile", "tiny", "--dry-run",
                          "--set", "web.max_images=3"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    resolved = yaml.safe_load(out)
    web = resolved["web"]
    assert web["max_images"] == 3 and web["store_uploads"] is False and "model_alias" not in web
    assert resolved["registry"]["champion_alias"] == "champion"      # names and aliases live in registry only
