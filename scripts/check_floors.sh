#!/usr/bin/env bash
# Install pyproject's dependency floors (scripts/floors.txt) into a fresh virtual environment, then run the unit
# tests and a short fit (W&B offline, images logged), evaluate and a pretrained check with exactly those versions.
#   bash scripts/check_floors.sh [VENV_DIR]      # default: a temporary folder; exits non-zero on any failure
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH
venv=${1:-$(mktemp -d)/floors}
work=$(mktemp -d)
python -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q -c scripts/floors.txt -e '.[test]'
"$py" -m pip freeze | grep -i -E "^($(grep -v '^#' scripts/floors.txt | cut -d= -f1 | paste -sd'|'))=="
"$py" -m pytest -q -p no:cacheprovider tests/unit
export WANDB_MODE=offline HOME="$work/home" CAPSDIST_MNIST_DIR="$PWD/data/mnist"
"$py" -m capsdist.train fit --config configs/quickstart.yaml --trainer.max_steps 6 --trainer.val_check_interval 3 \
  --trainer.limit_val_batches 2 --data.train_samples 512 --data.num_workers 1 --model.log_images_every_n_steps 3 \
  --model.log_diagnostics_every_n_steps 3 --trainer.default_root_dir "$work/run"
"$py" -m capsdist.evaluate --ckpt "$work/run/checkpoints/last.ckpt" --data.val_samples 256 --device cpu
"$py" -m capsdist.pretrained check --weights pretrained/capsnet-mnist.safetensors --limit 200 --device cpu
echo "floors passed: $(grep -v '^#' scripts/floors.txt | paste -sd' ')"
