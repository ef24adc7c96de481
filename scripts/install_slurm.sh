#!/usr/bin/env bash
# Install the Debian packages the SLURM tests need (tests/slurm_cluster.py starts a private single-host cluster):
# munge, slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server. A step of .ci/run, before pytest.
# Does nothing when every executable is already there; installs with apt-get as root; else warns and exits 0.
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"
declare -A exe=([munge]=munged [slurmctld]=slurmctld [slurmd]=slurmd [slurm-client]=sbatch [slurmdbd]=slurmdbd
                [mariadb-server]=mariadbd)
missing=()
for pkg in "${!exe[@]}"; do
  command -v "${exe[$pkg]}" >/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" -ne 0 ]; then
  # not fatal: the SLURM tests then skip with this reason (and fail under CI=1, where they must run)
  echo "install_slurm.sh: missing ${missing[*]}; installing needs root and apt-get, SLURM tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
