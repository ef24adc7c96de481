#!/usr/bin/env bash
# README's test command as a new user on a slower 2-core host without native bf16 (an AMD EPYC Zen 3) would run it,
# emulated on a faster host: a fresh clone of COMMIT and a fresh virtual environment; every process confined to a
# CPU share of CORES (a cgroup-v1 CPU quota; needs root); torch's and oneDNN's kernels limited to AVX2 (Zen 3 has no
# AVX-512 and no bf16 instructions, so bf16 is emulated there ~50x slower than fp32); an empty inductor cache.
#   sudo bash scripts/slow_host.sh COMMIT [CORES]   (CORES default 1.44: the Zen 3 host's speed over the 2-core Xeon's)
# Prints the whole command's seconds and exit code; its output is in /tmp/slow-host-COMMIT.out.
set -euo pipefail
commit=$(git -C "$(dirname "$0")/.." rev-parse "${1:?usage: slow_host.sh COMMIT [CORES]}")
cores=${2:-1.44}
work=/tmp/slow-host-$commit
group=/sys/fs/cgroup/cpu/slow-host-$$
rm -rf "$work" "$work-venv" "$work-inductor"
git clone -q "$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)" "$work"
git -C "$work" checkout -q "$commit"
python3 -m venv "$work-venv"
mkdir "$group"
trap 'echo $$ > /sys/fs/cgroup/cpu/tasks; rmdir "$group"' EXIT
echo 100000 > "$group/cpu.cfs_period_us"
awk -v c="$cores" 'BEGIN { printf "%d\n", c * 100000 }' > "$group/cpu.cfs_quota_us"
echo $$ > "$group/tasks"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TORCHINDUCTOR_CACHE_DIR="$work-inductor"
cd "$work"
# shellcheck disable=SC1091
source "$work-venv/bin/activate"
start=$(date +%s)
set +e
bash -c "bash scripts/install_slurm.sh && pip install torch==2.13.0 -e '.[test]' && ruff check . && python -m pytest -q" \
  > "$work.out" 2>&1
code=$?
set -e
echo "{\"commit\": \"$commit\", \"cores\": $cores, \"exit_code\": $code, \"seconds\": $(($(date +%s) - start))," \
  "\"result\": \"$(grep -E '(passed|failed)' "$work.out" | tail -1 | tr -d '=')\"}"
