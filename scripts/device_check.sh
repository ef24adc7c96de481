#!/usr/bin/env bash
# Every GPU figure capsdist needs, in one call of at most ~9 minutes on a bare GPU machine with no network:
#   bash scripts/device_check.sh --wheels DIR [--out DIR] [--budget SECONDS]
# The machine needs torch, pytorch-lightning, torchmetrics, numpy, pillow, pyyaml, tqdm and safetensors; what
# else capsdist needs (jsonargparse, webdataset and their small dependencies) is installed from the wheels in
# DIR, downloaded beforehand on a machine with network (docs/gpu.md):
#   pip download -d DIR --only-binary=:all: --python-version 3.12 'jsonargparse[signatures]' webdataset
# W&B is not needed: the training stage runs with --wandb_mode disabled.
# Results: JSON lines on stdout and in OUT/device_check.jsonl (OUT = --out, else $OUT, else device_check_out),
# logs in OUT/device_check.log, the trained model in OUT/capsnet-mnist.safetensors.
# DEVICE_CHECK_SMOKE=1 runs every stage on the CPU with tiny sizes (CI does, in under 3 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${CAPSDIST_PYTHON:-python3}
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
missing=$("$python" - <<'PY'
import importlib.util
needed = ["jsonargparse", "docstring_parser", "typeshed_client", "webdataset", "braceexpand", "safetensors"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -z "$wheels" ]; then
    echo "device_check: missing Python packages: $missing. Fix: download their wheels where there is network" \
      "(see the header of scripts/device_check.sh) and pass --wheels DIR." >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --find-links "$wheels" 'jsonargparse[signatures]' webdataset safetensors \
    || { echo "device_check: installing from $wheels failed (above). Fix: download wheels for this Python" \
      "($("$python" -V 2>&1)) as the header of scripts/device_check.sh shows." >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" scripts/device_check.py ${args[@]+"${args[@]}"}
