# Shared body of the capsdist sbatch templates (sourced by them; not submitted on its own).
# Starts one training task per device with srun; Lightning's SLURMEnvironment reads rank and world size from
# srun's variables and checks them against trainer.num_nodes/devices (set here from the allocation).
# Stops (README "Scaling out"): the tasks save at the next step boundary on SIGUSR1 or SIGTERM
# (capsdist.stop). This shell traps both and forwards them to the tasks, so `--signal=USR1@90`,
# `--signal=B:USR1@90` and `scancel --signal=USR1 --batch` all work; when the tasks exit 75 (saved on SIGUSR1)
# this shell, on the host where scontrol exists, requeues the job, and the requeue resumes by itself.
set -euo pipefail
# Sites that start jobs with a bare environment (SBATCH_EXPORT=NONE) activate theirs here.
if [[ -n "${CAPSDIST_ACTIVATE:-}" ]]; then source "${CAPSDIST_ACTIVATE}"; fi
config=${1:?usage: sbatch [sbatch options] slurm/<template>.sbatch CONFIG.yaml [--run_name NAME] [overrides...]}
shift
# The run folder is per experiment: job name plus a hash of what defines it, the config files' contents and the
# overrides (or --run_name), plus the array task. Resume flags and the budget are not part of it: the same sbatch
# line plus `--ckpt_path last` (or a larger --trainer.max_steps/max_epochs/max_time) finds the same folder, and a
# requeue of the job computes it again and resumes there.
args=() defining=() run_name=""
while (($#)); do
  case "$1" in
    --run_name=*) run_name=${1#--run_name=} ;;
    --run_name) run_name=${2:?--run_name needs a value}; shift ;;
    --ckpt_path=* | --trainer.max_steps=* | --trainer.max_epochs=* | --trainer.max_time=*) args+=("$1") ;;
    --ckpt_path | --trainer.max_steps | --trainer.max_epochs | --trainer.max_time)
      args+=("$1" "${2:?$1 needs a value}"); shift ;;
    *) args+=("$1") defining+=("$1") ;;
  esac
  shift
done
if [[ -z "${run_name}" ]]; then
  files=("${config}")
  for ((i = 0; i < ${#defining[@]}; i++)); do
    if [[ "${defining[i]}" == --config ]]; then files+=("${defining[i + 1]:-}"); fi
    if [[ "${defining[i]}" == --config=* ]]; then files+=("${defining[i]#--config=}"); fi
  done
  run_hash=$( (cat "${files[@]}" && printf '%s\n' "${defining[@]+"${defining[@]}"}") | sha256sum | cut -c1-8)
  run_name="${SLURM_JOB_NAME}-${run_hash}"
fi
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then run_name="${run_name}-task${SLURM_ARRAY_TASK_ID}"; fi
root_dir=${CAPSDIST_ROOT_DIR:-runs/${run_name}}
gpus=${SLURM_GPUS_ON_NODE:-0}
if ((gpus > 0 && gpus != SLURM_NTASKS_PER_NODE)); then
  echo "capsdist: error: ${gpus} GPUs per node but ${SLURM_NTASKS_PER_NODE} tasks per node; one task drives one" \
    "GPU, so the others would sit idle. Fix: pass --ntasks-per-node=${gpus} with --gpus-per-node=${gpus}." >&2
  exit 2
fi
# A login shell's leftovers must not point the ranks at another job's rendezvous: Lightning derives the address
# from the node list and the port from the job id (15000 + its last 4 digits) unless CAPSDIST_MASTER_PORT is set.
unset MASTER_ADDR MASTER_PORT
if [[ -n "${CAPSDIST_MASTER_PORT:-}" ]]; then export MASTER_PORT=${CAPSDIST_MASTER_PORT}; fi
# The remaining-time check: stop (and requeue) before a validation pass that would end past the time limit.
end=$(squeue -h -j "${SLURM_JOB_ID}" -o %e 2>/dev/null || true)
CAPSDIST_JOB_END=$(date -d "${end}" +%s 2>/dev/null || true)
export CAPSDIST_JOB_END CAPSDIST_STOP_LEAD_S=${CAPSDIST_STOP_LEAD_S:-90} CAPSDIST_REQUEUE=batch
# Rank 0 (srun places it on this, the first, node) leaves this file when it saved for a requeue: the exit status
# alone is not enough, srun reports the highest code of all tasks.
export CAPSDIST_REQUEUE_MARK="${TMPDIR:-/tmp}/capsdist-requeue-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
rm -f "${CAPSDIST_REQUEUE_MARK}"
echo "capsdist: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s); run folder requested: ${root_dir}"
# srun does not inherit --cpus-per-task from sbatch in Slurm 22.05-23.02: pass it on.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${CAPSDIST_PYTHON:-python}" \
  -m capsdist.train fit --config "${config}" --trainer.num_nodes="${SLURM_NNODES}" \
  --trainer.devices="${SLURM_NTASKS_PER_NODE}" --trainer.default_root_dir="${root_dir}" \
  ${args[@]+"${args[@]}"} &
tasks=$!
trap 'kill -USR1 "${tasks}" 2>/dev/null || true' USR1
trap 'kill -TERM "${tasks}" 2>/dev/null || true' TERM
status=0
while true; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
  wait "${tasks}" && status=0 || status=$?
  if ! kill -0 "${tasks}" 2>/dev/null; then break; fi
done
if [[ "${status}" == 75 || -f "${CAPSDIST_REQUEUE_MARK}" ]]; then
  rm -f "${CAPSDIST_REQUEUE_MARK}"
  echo "capsdist: the tasks saved and asked to be requeued: scontrol requeue ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
