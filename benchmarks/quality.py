"""Model quality: recipes compared on the same wall-clock budget, over seeds and salts, by the judge.

For every salt (the site's pseudonym salt decides the patient split): ingest, preprocess and
validate once into ``<work>/<salt>/``. For every recipe and training seed: ``radsynth train``
(``--set train.recipe=R --set seed=S``, the profile's ranks and threads: on the cpu profile two
single-threaded ranks, so a run is deterministic and is exactly what the demo trains) and
``radsynth evaluate`` (the calibrated judge of the project's evaluation, at the profile's gate
level). Finished steps are reused, so the script can be stopped and rerun, and ``--phase
train`` can train ahead of an evaluation that is not there yet.

The recipes' kimg schedules are what the same wall-clock budget buys each of them on an
idle 2-core machine (docs/benchmarks.md: throughput per stage with ``benchmarks/train.py``),
so the comparison is at equal time, not equal kimg.

Reported per recipe, mean +- sd over seeds x salts: per-condition domain Fréchet distance in
units of the size-matched real reference (``fid_domain_units/<c>``), condition accuracy,
recall, TSTR and TRTR balanced accuracy, the gate verdict and its smallest relative margin.
``--gate-salts`` adds one run of the first recipe (the default seed) on further salts to
count how often the gate passes. ``--ema-probes 0,0.5,1`` makes every run keep G averages at
those half-lives too (``train.ema_probes``: training is unchanged) and evaluates each as a row
``<recipe>@ema<h>``, so the EMA half-life is chosen from the same runs, not from new ones.
``--utility`` evaluates with the utility classifiers on (TSTR, TRTR; each run's
``evaluate-utility/``), so finished runs gain TSTR without retraining or losing the
evaluation they had. Prints tables; writes ``benchmarks/results/quality.json``.

    /work/tools/heavy .venv/bin/python benchmarks/quality.py --recipes cpu-pgcgan-sa,cpu-dcgan \\
        --seeds 1234,1,2 --salts quality-a,quality-b --gate-salts quality-salt-0003,quality-salt-0004,quality-salt-0005 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from model.trainer import ema_probe_path  # noqa: E402
from radsynth import metric_keys as mk  # noqa: E402
from radsynth.io import write_json  # noqa: E402

BIN = Path(sys.executable).parent


WRAP: list[str] = []     # --wrap: a command each step runs under (e.g. a shared-CPU lock)
# Per salt: the first evaluation trains the judge and the calibration sets into the salt's cache;
# with --jobs > 1 the others wait for it, rather than train the same judge side by side.
_FIRST_EVAL: dict[Path, threading.Lock] = {}
_WARM: set[Path] = set()            # salts whose cache one evaluation has filled
_FIRST_EVAL_GUARD = threading.Lock()


def _run(cmd: list[str], log: Path, env: dict) -> int:
    cmd = [*WRAP, *cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


def _radsynth(step: str, args: argparse.Namespace, salt_dir: Path, sets: list[str]) -> list[str]:
    cmd = [str(BIN / "radsynth"), step, "--profile", args.profile, "--set", f"paths.artifacts={salt_dir}"]
    for s in [*args.set, *sets]:
        cmd += ["--set", s]
    return cmd


def _env(salt: str) -> dict:
    return {**os.environ, "RADSYNTH_SALT": salt, "MLFLOW_ENABLE_TELEMETRY": "false", "GX_ANALYTICS_ENABLED": "false",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def prepare(args: argparse.Namespace, salt: str) -> Path:
    """Ingest, preprocess, validate for one salt (reused when the dataset is there)."""
    salt_dir = Path(args.work).resolve() / salt
    if (salt_dir / "validate" / "report.json").is_file():
        return salt_dir
    from radsynth.deid import SaltError, check_salt

    try:   # the salt is the site's RADSYNTH_SALT, verbatim: refuse here what ingest would refuse
        check_salt(salt, f"--salts {salt!r}")
    except SaltError as exc:
        raise SystemExit(str(exc)) from None
    for step in ("ingest", "preprocess", "validate"):
        rc = _run(_radsynth(step, args, salt_dir, []), salt_dir / f"{step}.log", _env(salt))
        if rc:
            raise SystemExit(f"{step} failed for salt {salt} (see {salt_dir / (step + '.log')})")
    return salt_dir


def label_of(recipe: str, tag: str) -> str:
    """A recipe's row label: ``<recipe>``, or ``<recipe>+<tag>`` for a ``--tag``ged variant."""
    return f"{recipe}+{tag}" if tag else recipe


def run_dir_of(salt_dir: Path, label: str, seed: int, probes: list[float]) -> Path:
    """A run's folder: ``<label>-seed<S>``, or ``ema-<label>-seed<S>`` when it keeps EMA probes."""
    return salt_dir / "runs" / f"{'ema-' if probes else ''}{label}-seed{seed}"


def evaluate_one(args: argparse.Namespace, salt: str, salt_dir: Path, sets: list[str], generator: Path, out: Path) -> dict:
    """``radsynth evaluate`` of one generator into ``out`` (reused when its metrics are there)."""
    metrics_json = out / "metrics.json"
    if not metrics_json.is_file():
        eval_sets = [*sets, f"eval.cache_dir={salt_dir / 'cache'}"]
        cmd = _radsynth("evaluate", args, salt_dir, eval_sets) + ["--generator", str(generator), "--dataset", str(salt_dir / "dataset"),
                                                                "--out", str(out), "--allow-fail"]
        with _FIRST_EVAL_GUARD:
            lock = _FIRST_EVAL.setdefault(salt_dir, threading.Lock())
        if salt_dir in _WARM:
            _run(cmd, out.parent / f"{out.name}.log", _env(salt))
        else:
            with lock:
                _run(cmd, out.parent / f"{out.name}.log", _env(salt))
                _WARM.add(salt_dir)
    if not metrics_json.is_file():
        return {"error": f"evaluate wrote no metrics (see {out.parent / (out.name + '.log')})"}
    result: dict = {"metrics": json.loads(metrics_json.read_text())}
    gate_json = out / "gate.json"
    if gate_json.is_file():
        gate = json.loads(gate_json.read_text())
        result["gate_passed"] = bool(gate.get("passed"))
        result["gate_failed"] = gate.get("failed", [])
        result["gate_min_margin"] = min_margin(gate.get("checks", []))
    return result


def stale_keys(args: argparse.Namespace, salt_dir: Path, saved: dict, train_sets: list[str], ignore: frozenset[str]) -> list[str]:
    """The model/train keys (and seed) in which a finished run (``saved``: its resolved
    params.yaml) differs from what its recipe gives now (a reused run must be the recipe's
    run, not an older one's). A key the saved params lack (added to the code later) counts
    at its default, which is what the run was trained with."""
    from model.trainer import changed_keys
    from radsynth.config import load_params, parse_override

    overrides = dict(parse_override(s) for s in [f"paths.artifacts={salt_dir}", *args.set, *train_sets])
    now = load_params(ROOT / "params.yaml", profile=args.profile, overrides=overrides).to_dict()
    return changed_keys(now, saved, ignore)


def run_one(args: argparse.Namespace, salt: str, salt_dir: Path, recipe: str, seed: int, phase: str) -> list[dict]:
    """Train (and evaluate) one recipe x seed on one salt's dataset; returns what was found.

    With ``--ema-probes`` the run also keeps G averages at those half-lives
    (``train.ema_probes``, which do not change training) and each is evaluated as its own
    row; every row of such a run, its own G_ema included, is labelled ``<recipe>@ema<h>``.
    With ``--tag T`` (a variant: the recipe plus the ``--set`` overrides) runs and rows are
    ``<recipe>+T`` instead, so a variant never reuses, or is refused as, the recipe's own runs.
    """
    probes = args.ema_probes
    label = label_of(recipe, args.tag)
    run_dir = run_dir_of(salt_dir, label, seed, probes)
    sets = [f"train.recipe={recipe}", f"seed={seed}", "train.tracking=false", "train.progress=false"]
    sets += [f"train.threads={args.threads}"] if args.threads > 0 else []
    train_sets = [*sets, f"train.ema_probes=[{', '.join(f'{h:g}' for h in probes)}]"] if probes else sets
    result = {"salt": salt, "recipe": label, "seed": seed, "dir": str(run_dir)}
    train_json = run_dir / "train" / "train.json"
    if not (train_json.is_file() and json.loads(train_json.read_text()).get("complete")):
        t0 = time.time()
        rc = _run(_radsynth("train", args, salt_dir, train_sets) + ["--dataset", str(salt_dir / "dataset"), "--out", str(run_dir / "train")],
                  run_dir / "train.log", _env(salt))
        if rc:
            return [{**result, "error": f"train exit {rc} (see {run_dir / 'train.log'})"}]
        result["train_wall_s"] = round(time.time() - t0, 1)
    summary = json.loads(train_json.read_text())
    result.update(kimg=summary.get("kimg"), train_seconds=summary.get("seconds"), threads=summary.get("threads"))
    saved_yaml = run_dir / "train" / "params.yaml"
    if not saved_yaml.is_file():
        return [{**result, "error": f"{run_dir} has no {saved_yaml.name}; move it away (or use another --work) to train it again"}]
    saved = yaml.safe_load(saved_yaml.read_text())
    stale = stale_keys(args, salt_dir, saved, train_sets, ignore=frozenset({"ema_kimg"} if probes else ()))
    if stale:
        return [{**result, "error": f"{run_dir} was trained with other params than {recipe} gives now ({', '.join(stale)}); "
                                    f"move it away (or use another --work) to train it again"}]
    if phase == "train":
        return [result]
    run_ema = float(saved["train"]["ema_kimg"])
    main = {**result, "recipe": f"{label}@ema{run_ema:g}", "ema_kimg": run_ema} if probes else result
    eval_sets, eval_name = evaluation_of(sets, args.utility)
    rows = [{**main, **evaluate_one(args, salt, salt_dir, eval_sets, run_dir / "train" / "G_ema.safetensors", run_dir / eval_name)}]
    for h in (h for h in probes if h != run_ema):     # a probe at the run's own half-life is its G_ema
        generator = Path(summary.get("ema_probes", {}).get(f"{h:g}", ema_probe_path(run_dir / "train", h)))
        rows.append({**result, "recipe": f"{label}@ema{h:g}", "ema_kimg": h, "probe": True,
                     **evaluate_one(args, salt, salt_dir, eval_sets, generator, run_dir / f"{eval_name}-h{h:g}")})
    return rows


def run_one_safely(args: argparse.Namespace, salt: str, salt_dir: Path, recipe: str, seed: int, phase: str) -> list[dict]:
    """``run_one``, with an unexpected error (e.g. params.yaml edited under a running script, so
    this process's config no longer reads it) turned into that run's error row: the other runs'
    results are still printed and written."""
    try:
        return run_one(args, salt, salt_dir, recipe, seed, phase)
    except Exception as exc:  # noqa: BLE001 - one run's failure must not lose the others'
        return [{"salt": salt, "recipe": label_of(recipe, args.tag), "seed": seed,
                 "error": f"{type(exc).__name__}: {exc} (rerun the same command: finished steps are reused)"}]


def evaluation_of(sets: list[str], utility: bool) -> tuple[list[str], str]:
    """The ``--set``s and folder name of a run's evaluation: ``evaluate``, or with the utility
    classifiers on (the last ``--set`` wins over a global ``eval.utility.enabled=false``),
    ``evaluate-utility``, so the two evaluations of one run never overwrite each other."""
    if utility:
        return [*sets, "eval.utility.enabled=true"], "evaluate-utility"
    return list(sets), "evaluate"


def relative_margin(check: dict) -> float | None:
    """How far inside its threshold a check is, as a fraction of the threshold (negative: failed)."""
    value, threshold, op = check.get("value"), check.get("threshold"), check.get("op")
    if value is None or threshold in (None, 0) or op not in ("<=", ">="):
        return None
    gap = (threshold - value) if op == "<=" else (value - threshold)
    return gap / abs(threshold)


def min_margin(checks: list[dict]) -> dict | None:
    margins = [(relative_margin(c), c.get("name")) for c in checks]
    margins = [(m, n) for m, n in margins if m is not None]
    if not margins:
        return None
    m, name = min(margins)
    return {"margin": round(m, 4), "check": name}


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def aggregate(results: list[dict], classes: list[str]) -> dict:
    """Mean +- sd per recipe of each reported figure (over seeds x salts)."""
    figures = [(f"{mk.FID_DOMAIN_UNITS}/{c}", f"FD units {c}") for c in classes]
    figures += [(f"{mk.COND_ACC}/{c}", f"cond acc {c}") for c in classes]
    figures += [(f"{mk.RECALL}/{c}", f"recall {c}") for c in classes]
    figures += [(mk.TSTR_BALANCED_ACC, "TSTR bal. acc"), (mk.TRTR_BALANCED_ACC, "TRTR bal. acc")]
    out: dict = {}
    def order(name: str) -> tuple[str, float]:      # <recipe>@ema<h>: by recipe, then by half-life
        base, _, h = name.partition("@ema")
        return base, float(h) if h else -1.0

    for recipe in sorted({r["recipe"] for r in results}, key=order):
        rows = [r for r in results if r["recipe"] == recipe and "metrics" in r]
        agg = {}
        for key, label in figures:
            mean, sd, n = _mean_sd([r["metrics"].get(key) for r in rows])
            agg[key] = {"label": label, "mean": mean, "sd": sd, "n": n}
        ratios = [r["metrics"][mk.TSTR_BALANCED_ACC] / r["metrics"][mk.TRTR_BALANCED_ACC] for r in rows
                  if r["metrics"].get(mk.TSTR_BALANCED_ACC) is not None and r["metrics"].get(mk.TRTR_BALANCED_ACC)]
        mean, sd, n = _mean_sd(ratios)
        agg["tstr_over_trtr"] = {"label": "TSTR / TRTR", "mean": mean, "sd": sd, "n": n}
        agg["gate_pass"] = {"label": "gate passed", "passed": sum(bool(r.get("gate_passed")) for r in rows), "runs": len(rows)}
        out[recipe] = agg
    return out


def run_rows(results: list[dict], classes: list[str]) -> list[str]:
    """One line per evaluated run: salt, row label, seed, then FD units, condition accuracy and
    recall per condition (``a / b / c`` in ``classes`` order), the verdict and its smallest margin."""
    def triple(prefix: str, fmt: str) -> str:
        return " / ".join(format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
                          for v in (r["metrics"].get(f"{prefix}/{c}") for c in classes))

    lines = []
    for r in sorted((r for r in results if "metrics" in r), key=lambda r: (r["recipe"], r["salt"], r["seed"])):
        m = r.get("gate_min_margin") or {}
        margin = f"{100 * m['margin']:.1f} % ({m.get('check')})" if m.get("margin") is not None else "-"
        verdict = "pass" if r.get("gate_passed") else "FAIL " + ",".join(r.get("gate_failed") or [])
        lines.append(f"{r['salt']:<22} {r['recipe']:<28} {r['seed']:>5}  FD {triple(mk.FID_DOMAIN_UNITS, '.1f'):<18} "
                     f"acc {triple(mk.COND_ACC, '.3f'):<23} recall {triple(mk.RECALL, '.2f'):<18} {verdict}  {margin}")
    return lines


def print_tables(agg: dict, results: list[dict], gate_runs: list[dict], classes: list[str] | None = None) -> None:
    """One row per recipe (and EMA probe): mean +- sd of each figure over seeds x salts."""
    recipes = list(agg)
    if not recipes:
        print("no evaluated runs yet")
        return
    keys = [k for k in agg[recipes[0]] if k != "gate_pass"]
    width = max(len(r) for r in recipes) + 2
    for group in (keys[i:i + 3] for i in range(0, len(keys), 3)):
        print(f"{'recipe':<{width}}" + "".join(f"{agg[recipes[0]][k]['label']:>30}" for k in group))
        for r in recipes:
            print(f"{r:<{width}}" + "".join(f"{agg[r][k]['mean']:>15.3f} +- {agg[r][k]['sd']:<7.3f} n{agg[r][k]['n']:<3}" for k in group))
        print()
    print(f"{'recipe':<{width}}{'gate passed':>14}")
    for r in recipes:
        print(f"{r:<{width}}{str(agg[r]['gate_pass']['passed']) + ' / ' + str(agg[r]['gate_pass']['runs']):>14}")
    if classes:
        print(f"\nper run (FD units, condition accuracy, recall: {' / '.join(classes)}; gate, smallest margin):")
        for line in run_rows(results, classes):
            print("  " + line)
    if gate_runs:
        print("\ngate over salts (first recipe, default seed):")
        for r in gate_runs:
            m = r.get("gate_min_margin") or {}
            print(f"  {r['salt']:<22} passed={r.get('gate_passed')}  smallest margin {m.get('margin')} ({m.get('check')})  failed {r.get('gate_failed')}")


def report(paths: list[Path]) -> int:
    """Tables of finished result files, without running anything: runs of every file pooled by row label."""
    runs: list[dict] = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"--report {path}: not a readable result file ({exc})")
        seen = {(r["salt"], r["recipe"], r["seed"]) for r in runs}     # a run two files hold counts once
        runs += [r for r in doc.get("runs", []) if "metrics" in r and (r["salt"], r["recipe"], r["seed"]) not in seen]
    if not runs:
        raise SystemExit("--report: no evaluated runs in " + ", ".join(map(str, paths)))
    # the conditions, in the order the first run's evaluation named them
    classes = [k.split("/", 1)[1] for k in runs[0]["metrics"] if k.startswith(mk.FID_DOMAIN_UNITS + "/")]
    print_tables(aggregate(runs, classes), runs, [], classes)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--recipes", default="cpu-pgcgan-sa,cpu-dcgan")
    ap.add_argument("--seeds", default="1234,1,2", help="training seeds (params.seed of train; the split stays the salt's)")
    ap.add_argument("--salts", default="quality-a,quality-b")
    ap.add_argument("--gate-salts", default="", help="further salts: the first recipe, first seed only (gate pass count)")
    ap.add_argument("--threads", type=int, default=0, help="train.threads of every run (0: the profile's; the cpu profile's two ranks run one thread each)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--phase", choices=("train", "all"), default="all")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "quality"))
    ap.add_argument("--set", action="append", default=[], help="extra --set for every step")
    ap.add_argument("--ema-probes", default="", help="comma-separated G_ema half-lives (kimg) each run also keeps and evaluates "
                                                         "(train.ema_probes; runs under ema-<recipe>-seed<S>)")
    ap.add_argument("--tag", default="", help="a variant's name: runs under <recipe>+TAG-seed<S>, rows labelled <recipe>+TAG "
                                              "(for a recipe changed by --set, kept apart from the recipe's own runs)")
    ap.add_argument("--utility", action="store_true", help="evaluate with eval.utility.enabled=true (TSTR, TRTR, augmentation) "
                    "into <run>/evaluate-utility, beside (not instead of) a run's evaluation without it")
    ap.add_argument("--wrap", default="", help="run every step under this command (e.g. /work/tools/heavy on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    ap.add_argument("--report", default="", help="comma-separated result JSONs of earlier runs: print their tables "
                                                 "(runs pooled per row label) and run nothing")
    args = ap.parse_args(argv)
    if args.report:
        return report([Path(f) for f in args.report.split(",") if f])
    WRAP[:] = args.wrap.split() if args.wrap else []
    recipes = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    salts = [s for s in args.salts.split(",") if s]
    gate_salts = [s for s in args.gate_salts.split(",") if s]
    args.ema_probes = [float(h) for h in args.ema_probes.split(",") if h]
    if args.tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}", args.tag):
        raise SystemExit(f"--tag {args.tag!r}: use 1-40 letters, digits, '.', '_' or '-' (it names run folders)")

    prepared = {salt: prepare(args, salt) for salt in [*salts, *gate_salts]}
    jobs = [(salt, recipe, seed) for salt in salts for recipe in recipes for seed in seeds]
    jobs += [(salt, recipes[0], seeds[0]) for salt in gate_salts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one_safely, args, salt, prepared[salt], recipe, seed, args.phase) for salt, recipe, seed in jobs]
        results = [row for f in futures for row in f.result()]
    for r in results:
        if "error" in r:
            print(f"ERROR {r['salt']} {r['recipe']} seed {r['seed']}: {r['error']}")
    classes = json.loads((prepared[salts[0]] / "dataset" / "dataset.json").read_text())["classes"] if salts else []
    main_runs = [r for r in results if r["salt"] in salts]
    gate_runs = [r for r in results if r["recipe"].split("@")[0] == label_of(recipes[0], args.tag)
                 and r["seed"] == seeds[0] and not r.get("probe")]
    agg = aggregate(main_runs, classes) if args.phase == "all" else {}
    if args.phase == "all":
        print_tables(agg, main_runs + [r for r in results if r["salt"] in gate_salts], gate_runs, classes)
    else:
        for r in results:
            print(f"trained {r['salt']} {r['recipe']} seed {r['seed']}: {r.get('kimg')} kimg in {r.get('train_seconds')} s")
    write_json(args.out, {"profile": args.profile, "recipes": recipes, "tag": args.tag, "sets": args.set, "utility": args.utility,
                          "seeds": seeds, "salts": salts, "gate_salts": gate_salts,
                          "threads": args.threads, "ema_probes": args.ema_probes, "aggregate": agg, "runs": results,
                          "gate_over_salts": [{k: r.get(k) for k in ("salt", "gate_passed", "gate_failed", "gate_min_margin")}
                                              for r in gate_runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
