"""``radsynth deploy``: a running Triton picks up the registry's promoted versions without a restart.

    radsynth promote && radsynth deploy          # the new @champion is served; the old one is unloaded

``radsynth serve`` starts tritonserver with ``serve.model_control`` (default ``explicit``:
``--model-control-mode=explicit --load-model=*``). ``deploy`` then, for every model in
``serve.models`` whose registry versions (``serve.aliases``) differ from the ones served:

1. builds that model's folder from the registry (sha256 verified, the flavour already served);
2. health check: loads it into the same server under a staging name (``<model>__staging``),
   checks it (generator: shapes, dtype, value range, determinism, seed sensitivity for every
   condition; other models: one finite inference) and unloads it again, so nothing untested
   ever takes traffic; a failure stops here and the old version keeps serving;
3. swaps: copies the new version folder into the live repository, replaces ``config.pbtxt``
   (its version policy now names only the new version) and asks Triton to load the model:
   Triton loads the new version while the old one keeps answering, then unloads the old;
4. removes the old version folder and records the new state in ``repository.json``.

With ``serve.model_control: poll`` the new folder and config are written into the repository
and Triton's next scan swaps them; ``deploy`` waits until the new version answers and checks it
then (a poll-mode server cannot be asked to load a staging copy first). With ``none`` a restart
is the only way, and ``deploy`` says so.

``deploy`` must see the repository the server reads (same machine or a shared volume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from radsynth.config import Params
from radsynth.errors import RadsynthError

STAGING_SUFFIX = "__staging"
_NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_UINT8": np.uint8, "TYPE_FP16": np.float16}


class DeployError(RadsynthError):
    """The new version was not deployed; the message says why and what is still served."""


class _AdminClient:
    """A tritonclient gRPC client that sends the admin key with the model-repository calls
    (``serving.server.restricted_api_flags``: load, unload and the repository index need it)."""

    ADMIN_CALLS = frozenset(("get_model_repository_index", "load_model", "unload_model"))

    def __init__(self, client, key: str):
        from serving.client import GRPC_RESTRICTED_PREFIX
        from serving.server import ADMIN_KEY_HEADER

        self._client, self._headers = client, {GRPC_RESTRICTED_PREFIX + ADMIN_KEY_HEADER: key} if key else None

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name in self.ADMIN_CALLS and self._headers:
            return lambda *args, **kwargs: attr(*args, headers=self._headers, **kwargs)
        return attr


def _grpc(url: str, key: str = ""):
    import tritonclient.grpc as grpcclient

    return _AdminClient(grpcclient.InferenceServerClient(url), key)


def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None)
    text = msg() if callable(msg) else str(exc)
    return str(text).strip().splitlines()[0] if text else type(exc).__name__


def _served_versions(triton, name: str) -> list[int]:
    index = triton.get_model_repository_index(as_json=True).get("models", [])
    return sorted(int(m["version"]) for m in index if m.get("name") == name and m.get("state") == "READY" and m.get("version"))


def health_check(params: Params, url: str, model: str, generator: bool) -> list[str]:
    """Problems found with ``model`` on the server at ``url`` (empty: healthy).

    A generator gets :meth:`serving.client.Client.check`; any other model one inference on
    small valid inputs built from its served config, whose outputs must be finite.
    """
    from serving.client import Client, ClientError

    cfg = params.serve
    with Client(url, "grpc", model, "", cfg.timeout_s, 0, cfg.backoff_s, cfg.max_images_per_call) as client:
        try:
            if generator:
                return [f"{name}: {detail}" for name, ok, detail in client.check() if not ok]
            config = client._model_config(model)
            inputs = {}
            rng = np.random.default_rng(0)
            for spec in config.get("input", []):
                dims = [int(d) if int(d) > 0 else 1 for d in spec.get("dims", [])]
                dtype = _NP.get(spec.get("data_type", "TYPE_FP32"), np.float32)
                shape = [2, *dims] if int(config.get("max_batch_size", 0)) > 0 else dims
                inputs[spec["name"]] = (rng.uniform(-1, 1, shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)).astype(dtype)
            outputs = client.run(model, inputs, [o["name"] for o in config.get("output", [])])
        except ClientError as exc:
            return [str(exc)]
    return [f"output {k} is not finite" for k, v in outputs.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]


def _stage(live: Path, fresh_model: Path, name: str) -> Path:
    """Copy a freshly built model folder into the live repository under the staging name."""
    staging = live / f"{name}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(fresh_model, staging)
    config = staging / "config.pbtxt"
    config.write_text(re.sub(r'^name: ".*"$', f'name: "{name}{STAGING_SUFFIX}"', config.read_text(), count=1, flags=re.M))
    return staging


def _swap_files(live: Path, fresh_model: Path, name: str) -> None:
    """New version folders in, then the new config.pbtxt (atomically) over the old one."""
    target = live / name
    target.mkdir(exist_ok=True)
    for vdir in fresh_model.iterdir():
        if vdir.is_dir() and not (target / vdir.name).exists():
            tmp = target / f".{vdir.name}.incoming"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(vdir, tmp)
            tmp.replace(target / vdir.name)
    from radsynth.io import atomic_write_text

    atomic_write_text(target / "config.pbtxt", (fresh_model / "config.pbtxt").read_text())


def _drop_old(live: Path, name: str, keep: list[int]) -> None:
    for vdir in (live / name).iterdir():
        if vdir.is_dir() and vdir.name.isdigit() and int(vdir.name) not in keep:
            shutil.rmtree(vdir, ignore_errors=True)


def _wait_for(triton, name: str, versions: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _served_versions(triton, name) == versions:
            return True
        time.sleep(0.5)
    return False


def deploy(params: Params, url: str | None = None, repository: str | Path | None = None) -> dict:
    """Bring a running Triton to the registry's current versions of ``serve.models`` (see the module docstring).

    Args:
        params: resolved config (``serve``: models, aliases, model_control, ports; ``paths.mlflow_uri``).
        url: the server's gRPC ``host:port`` (default ``serve.url`` or ``serve.host`` + ``serve.grpc_port``).
        repository: the live model repository the server reads (default ``serve.repository``).

    Returns:
        ``{"url": ..., "changed": {model: {"from": [versions], "to": [versions]}}, "unchanged": [models]}``.

    Raises:
        DeployError: the server is not in a mode that can swap, the health check failed (the old
            version is still served), or the new version did not come up.
    """
    from radsynth.io import write_json
    from serving.repository import build_repository

    cfg = params.serve
    if cfg.model_control == "none":
        raise DeployError("serve.model_control is none: this server loads models only at start; restart it "
                          "(`radsynth serve`) or run it with serve.model_control explicit")
    live = Path(repository or cfg.repository)
    index_path = live / "repository.json"
    if not index_path.is_file():
        raise DeployError(f"{live}: no repository.json; is this the repository `radsynth serve` built and serves?")
    index = json.loads(index_path.read_text())
    if not url:
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        url = cfg.url if cfg.url and cfg.protocol == "grpc" else f"{host}:{cfg.grpc_port}"
    from serving.server import ADMIN_KEY_ENV, admin_key, admin_key_file

    key = admin_key(cfg)
    if not key:
        raise DeployError(f"no Triton admin key (loading and unloading models needs it): set ${ADMIN_KEY_ENV}, or run "
                          f"deploy as the user whose `radsynth serve` wrote {admin_key_file(cfg)}")
    triton = _grpc(url, key)
    try:
        live_server = triton.is_server_live()
    except Exception as exc:  # tritonclient raises its own type for a refused connection
        live_server, why = False, _message(exc)
    else:
        why = "it answers but is not live"
    if not live_server:
        raise DeployError(f"Triton at {url} cannot be reached ({why}); start it with `radsynth serve`")
    try:
        triton.get_model_repository_index()
    except Exception as exc:  # Triton's restricted model-repository API: a wrong key is refused
        raise DeployError(f"Triton at {url} refused the model-repository API ({_message(exc)}); the admin key "
                          f"(${ADMIN_KEY_ENV} or {admin_key_file(cfg)}) is not this server's") from None
    changed, unchanged = {}, []
    with tempfile.TemporaryDirectory(prefix=".radsynth-deploy-", dir=live.parent) as tmp:
        fresh_params = dataclasses.replace(params, serve=dataclasses.replace(cfg, repository=str(Path(tmp) / "fresh")))
        fresh = build_repository(fresh_params, flavour=index.get("flavour", cfg.flavour))
        wanted = json.loads((fresh / "repository.json").read_text())["models"]
        for name, versions in wanted.items():
            before = index.get("models", {}).get(name, [])
            if sorted(before) == sorted(versions) and _served_versions(triton, name) == sorted(versions):
                unchanged.append(name)
                continue
            generator = name == params.registry.model_name
            if cfg.model_control == "explicit":
                staging = _stage(live, fresh / name, name)
                try:
                    triton.load_model(staging.name)
                    problems = health_check(params, url, staging.name, generator)
                except Exception as exc:  # a load failure comes back as an InferenceServerException
                    problems = [f"it did not load: {_message(exc)}"]
                finally:
                    try:
                        triton.unload_model(staging.name)
                    except Exception:  # not loaded: nothing to unload
                        pass
                    shutil.rmtree(staging, ignore_errors=True)
                if problems:
                    raise DeployError(f"{name} v{','.join(map(str, versions))} failed its health check, so it was not deployed "
                                      f"(still serving v{','.join(map(str, before)) or ' none'}): " + "; ".join(problems[:5]))
                _swap_files(live, fresh / name, name)
                try:
                    triton.load_model(name)
                except Exception as exc:
                    raise DeployError(f"Triton refused to load {name} v{versions}: {_message(exc)}") from None
            else:
                _swap_files(live, fresh / name, name)
            if not _wait_for(triton, name, sorted(versions), cfg.ready_timeout_s):
                raise DeployError(f"{name}: Triton serves v{_served_versions(triton, name)} after {cfg.ready_timeout_s:.0f} s, "
                                  f"expected v{sorted(versions)}")
            if cfg.model_control == "poll":
                problems = health_check(params, url, name, generator)
                if problems:
                    raise DeployError(f"{name} v{versions} is served (poll mode swaps before checking) but unhealthy: "
                                      + "; ".join(problems[:5]) + "; roll back with `radsynth rollback && radsynth deploy`")
            _drop_old(live, name, versions)
            changed[name] = {"from": sorted(before), "to": sorted(versions)}
            index.setdefault("models", {})[name] = sorted(versions)
            write_json(index_path, index)
    triton.close()
    return {"url": url, "changed": changed, "unchanged": unchanged}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="Triton gRPC host:port (default serve.url or serve.host + serve.grpc_port)")
    parser.add_argument("--repository", default=None, help="the live model repository the server reads (default serve.repository)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    out = deploy(load_cli_params(args), args.url, args.repository)
    for name, change in out["changed"].items():
        print(f"{name}: now serving v{','.join(map(str, change['to']))} (was v{','.join(map(str, change['from'])) or ' none'}) "
              f"on {out['url']}, no restart", file=sys.stderr)
    for name in out["unchanged"]:
        print(f"{name}: already serving the registry's version", file=sys.stderr)
    return 0
