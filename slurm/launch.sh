# Shared body of the capsdist sbatch templates (sourced by them; not submitted on its own).
# Starts one training task per device with srun; Lightning's SLURMEnvironment reads rank and world size from
# srun's variables and checks them against trainer.num_nodes/devices (set here from the allocation).
# Stops (docs/scaling.md, "SLURM"): the tasks save at the next step boundary on SIGUSR1 or SIGTERM
# (capsdist.training.stop). The templates ask for `--signal=B:USR1@N`: only this shell gets the time-limit warning and
# forwards it to the tasks through srun (all-task `--signal=USR1@N` works too, but also reaches loader workers
# and W&B's service, and leaves this shell unaware). When the tasks stopped for a requeue (rank 0 leaves the
# requeue mark and every task ends 0; exit 75 from a task outside the templates means the same) this shell, on
# the host where scontrol exists, requeues the job (at most CAPSDIST_MAX_REQUEUES times) and exits 0, so the
# routine requeue is not a FAILED line in sacct; a SIGTERM from SLURM (requeue, preemption) also ends it with 0.
set -euo pipefail
max_requeues=${CAPSDIST_MAX_REQUEUES:-20}
if ((${SLURM_RESTART_COUNT:-0} > max_requeues)); then
  echo "capsdist: error: job ${SLURM_JOB_ID} has been requeued ${SLURM_RESTART_COUNT} times, more than" \
    "CAPSDIST_MAX_REQUEUES=${max_requeues}: not starting again. Fix: look at the earlier runs' logs; export" \
    "CAPSDIST_MAX_REQUEUES=<n> (sbatch --export=ALL,...) to allow more." >&2
  exit 3
fi
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
# The rendezvous: rank 0 runs on this, the first, node. A MASTER_ADDR exported by the user is kept when it is an
# address of this node (its InfiniBand name, say, to choose the network), with MASTER_PORT if given. One left
# over from elsewhere (a login shell, another job) names another host and is dropped, with its MASTER_PORT, so it
# cannot point the ranks at a dead rendezvous: Lightning then derives the address from the node list. The port is
# then CAPSDIST_MASTER_PORT, else one free on this node now (Lightning's own, 15000 + the job id's last 4 digits,
# collides for two jobs on one node whose ids end alike).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + SLURM_JOB_ID % 20000))
}
this_node() {  # whether $1 is an address of this host (loopback only for a one-node job)
  python3 - "$1" "${SLURM_NNODES:-1}" 2>/dev/null <<'PY'
import ipaddress, socket, sys
address = socket.gethostbyname(sys.argv[1])
if ipaddress.ip_address(address).is_loopback and int(sys.argv[2]) > 1:
    sys.exit(1)
socket.socket().bind((address, 0))
PY
}
if [[ -n "${MASTER_ADDR:-}" ]] && this_node "${MASTER_ADDR}"; then
  MASTER_PORT=${MASTER_PORT:-${CAPSDIST_MASTER_PORT:-$(free_port)}}
  echo "capsdist: rendezvous at the exported MASTER_ADDR=${MASTER_ADDR}, port ${MASTER_PORT}"
  export MASTER_ADDR
else
  if [[ -n "${MASTER_ADDR:-}${MASTER_PORT:-}" ]]; then
    echo "capsdist: ignoring MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-} from the submitting" \
      "environment: not an address of this job's first node ($(hostname)); export one of its names or addresses" \
      "to choose the rendezvous interface"
  fi
  unset MASTER_ADDR
  MASTER_PORT=${CAPSDIST_MASTER_PORT:-$(free_port)}
fi
export MASTER_PORT
# The remaining-time check: stop (and requeue) before a validation pass that would end past the time limit. The
# lead is the job's own --signal time (what the site or the user asked for), unless CAPSDIST_STOP_LEAD_S is set.
end=$(squeue -h -j "${SLURM_JOB_ID}" -o %e 2>/dev/null || true)
CAPSDIST_JOB_END=""  # none known (no squeue, no time limit); `date -d ""` would say today's midnight
if [[ -n "${end}" ]]; then CAPSDIST_JOB_END=$(date -d "${end}" +%s 2>/dev/null || true); fi
signal_s=$(scontrol show job "${SLURM_JOB_ID}" 2>/dev/null | grep -o 'Signal=[A-Z0-9:]*@[0-9]*' | cut -d@ -f2 || true)
export CAPSDIST_JOB_END CAPSDIST_STOP_LEAD_S=${CAPSDIST_STOP_LEAD_S:-${signal_s:-90}} CAPSDIST_REQUEUE=batch
# A time limit that leaves no time to train before the stop warning would requeue the job over and over with
# nothing saved: refuse it before anything starts. A run needs the lead plus about a minute (start, one step, save).
min_run_s=60
if [[ -n "${CAPSDIST_JOB_END}" ]]; then
  left=$((CAPSDIST_JOB_END - $(date +%s)))
  if ((left < CAPSDIST_STOP_LEAD_S + min_run_s)); then
    shorter=$((left - min_run_s))
    echo "capsdist: error: job ${SLURM_JOB_ID} has ${left} s until its time limit, but the tasks stop for a requeue" \
      "${CAPSDIST_STOP_LEAD_S} s before it (the job's --signal=...@${CAPSDIST_STOP_LEAD_S}, or CAPSDIST_STOP_LEAD_S) and a" \
      "run needs about ${min_run_s} s more to start, train a step and save: the job would be stopped before it" \
      "trained and requeued again and again with nothing saved. Nothing was started or written. Fix: sbatch" \
      "--time=$(((CAPSDIST_STOP_LEAD_S + min_run_s + 59) / 60)) (minutes) or more$( ((shorter >= 10)) &&
        echo ", or a shorter warning, --signal=B:USR1@${shorter} (enough to save a checkpoint?)")." >&2
    exit 2
  fi
fi
# Rank 0 (srun places it on this, the first, node) leaves this file, holding what it saved, when it stopped for a
# requeue: the exit status alone is not enough, srun reports the highest code of all tasks.
export CAPSDIST_REQUEUE_MARK="${TMPDIR:-/tmp}/capsdist-requeue-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
rm -f "${CAPSDIST_REQUEUE_MARK}"
# ... and this one when the tasks stopped on SIGTERM (they then exit 0; this script decides the job's exit below)
export CAPSDIST_STOP_MARK="${TMPDIR:-/tmp}/capsdist-stop-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
rm -f "${CAPSDIST_STOP_MARK}"
echo "capsdist: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s); run folder requested: ${root_dir}"
# srun does not inherit --cpus-per-task from sbatch in Slurm 22.05-23.02: pass it on.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${CAPSDIST_PYTHON:-python}" \
  -m capsdist.train fit --config "${config}" --trainer.num_nodes="${SLURM_NNODES}" \
  --trainer.devices="${SLURM_NTASKS_PER_NODE}" --trainer.default_root_dir="${root_dir}" \
  ${args[@]+"${args[@]}"} &
tasks=$! terminated=""
trap 'kill -USR1 "${tasks}" 2>/dev/null || true' USR1
trap 'terminated=1; kill -TERM "${tasks}" 2>/dev/null || true' TERM
status=0
while true; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
  wait "${tasks}" && status=0 || status=$?
  if ! kill -0 "${tasks}" 2>/dev/null; then break; fi
done
if [[ "${status}" == 75 || -f "${CAPSDIST_REQUEUE_MARK}" ]]; then
  said=$(cat "${CAPSDIST_REQUEUE_MARK}" 2>/dev/null || true)  # what rank 0 saved, in its words
  rm -f "${CAPSDIST_REQUEUE_MARK}"
  if ((${SLURM_RESTART_COUNT:-0} >= max_requeues)); then
    echo "capsdist: error: the tasks stopped for a requeue (${said:-exit 75}), but job ${SLURM_JOB_ID} was" \
      "requeued ${SLURM_RESTART_COUNT} times already (CAPSDIST_MAX_REQUEUES=${max_requeues}): resubmit it with" \
      "--ckpt_path last" >&2
    exit 75
  fi
  echo "capsdist: the tasks stopped for a requeue (${said:-exit 75}): scontrol requeue ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}" && exit 0
fi
# SLURM's own SIGTERM (requeue, preemption, scancel): the tasks stopped; SLURM records the job's state itself
said=""
if [[ -f "${CAPSDIST_STOP_MARK}" ]]; then said=$(cat "${CAPSDIST_STOP_MARK}"); said=${said:-stopped}; fi
rm -f "${CAPSDIST_STOP_MARK}"
if [[ -n "${terminated}" ]]; then exit 0; fi
# a SIGTERM that reached the tasks but not this shell (`scancel --signal=TERM`): stopped, but not finished
if [[ -n "${said}" ]]; then
  echo "capsdist: the tasks stopped on SIGTERM (${said}); the job exits 143 so that it does not look finished" \
    "(resubmit with --ckpt_path last)" >&2
  exit 143
fi
exit "${status}"
