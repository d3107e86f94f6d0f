"""``radsynth web``: run the web app under gunicorn (a production WSGI server) and print its URL.

The app is built once in the gunicorn master (``preload_app``) and forked into
``web.workers`` processes of ``web.threads`` threads each, so every worker shares one signing
key (sessions, CSRF, the signed reference on the result page). The key comes from the
environment variable named by ``web.secret_key_env``; when it is unset a random key is made
for this run (sessions then end when the server restarts).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys

from radsynth.config import Params
from radsynth.errors import RadsynthError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="listen address (default web.host, loopback)")
    parser.add_argument("--port", type=int, default=None, help="port (default web.port)")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn worker processes (default web.workers)")


def serve(params: Params, host: str, port: int, workers: int) -> None:
    """Run gunicorn in the foreground until Ctrl-C / SIGTERM."""
    from gunicorn.app.base import BaseApplication

    from serving.web.app import create_app

    cfg = params.web
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0:
            raise RadsynthError(f"port {port} on {host} is already in use; stop that server or pass --port / --set web.port=...")
    os.environ.setdefault(cfg.secret_key_env, secrets.token_hex(32))
    url = f"http://{host}:{port}/"

    class WebApplication(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "threads": cfg.threads,
                "worker_class": "gthread",
                "timeout": cfg.timeout_s,
                "graceful_timeout": 10,
                "preload_app": True,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "proc_name": "radsynth-web",
                "when_ready": lambda server: print(
                    f"radsynth web: serving on {url} (gunicorn, {workers} workers x {cfg.threads} threads; "
                    f"Triton {cfg.triton_url}, model {params.registry.model_name}@{params.registry.champion_alias}); Ctrl-C stops", flush=True),
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(params)

    WebApplication().run()


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    cfg = params.web
    serve(params, args.host or cfg.host, args.port or cfg.port, args.workers or cfg.workers)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from radsynth.cli import main

    sys.exit(main(["web", *sys.argv[1:]]))
