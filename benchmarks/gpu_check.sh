#!/usr/bin/env bash
# GPU checks of the training path, one script, under 8 minutes on one H100 / H200:
#   1. the gpu profile trained for a fixed kimg per stage up to 128x128 (synthetic data):
#      s/kimg and img/s per stage (anchor: StyleGAN2-ADA 13 s/kimg at 128 on one V100)
#   2. bfloat16 autocast vs fp32: loss agreement over 50 iterations from the same seed
#   3. one Triton round trip with the gpu flavour (skipped, with the reason, without tritonserver)
# Works with whatever PyTorch the machine has (>= 2.1; no exact pin), offline. Writes
# benchmarks/results/gpu_check.json; exit 1 when a part FAILs (SKIP is not a failure).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # install missing pure-Python deps offline first
#   DEVICE=cpu KIMG=0.1 RES=16 bash benchmarks/gpu_check.sh   # dry run of the script anywhere
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
LIMIT_S=${LIMIT_S:-470}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_ENABLE_TELEMETRY=false PYTHONUNBUFFERED=1

echo "== machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY' || { echo "torch is not importable with $PY"; exit 1; }
import torch, platform
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"available {torch.cuda.is_available()}  bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
PY

echo "== python dependencies the trainer needs"
missing=$("$PY" - <<'PY'
import importlib.util as u
need = {"yaml": "pyyaml", "numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm", "PIL": "pillow", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in need.items() if u.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing || { echo "offline install of [$missing] from $WHEELS failed"; exit 1; }
  else
    echo "missing: $missing (no network here: pass WHEELS=<folder of wheels> to install them offline)"; exit 1
  fi
fi
echo "ok"

echo "== checks (limit ${LIMIT_S} s)"
timeout --signal=INT "$LIMIT_S" "$PY" benchmarks/gpu_check.py --device "$DEVICE" \
  --resolution "${RES:-128}" --kimg "${KIMG:-2}" --iters "${ITERS:-50}" --out "${OUT:-benchmarks/results/gpu_check.json}"
rc=$?
[ $rc = 124 ] && echo "gpu_check: stopped after ${LIMIT_S} s (the figures printed above are what it measured)"
exit $rc
