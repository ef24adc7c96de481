# Shared body of the capsdist sbatch templates (sourced by them; not submitted on its own).
# Starts one training task per device with srun; Lightning's SLURMEnvironment reads rank and world size from
# srun's variables and checks them against trainer.num_nodes/devices (set here from the allocation). On SIGUSR1
# capsdist.parallel.SlurmRequeue (added by the training CLI) has all ranks save hpc_ckpt_N.ckpt at one step and requeues the job; the
# requeued run resumes from the newest hpc_ckpt (Lightning does that on its own under SLURM).
set -euo pipefail
config=${1:?usage: sbatch [sbatch options] slurm/<template>.sbatch CONFIG.yaml [LightningCLI overrides...]}
shift
# Stable per job name, not per job id: the requeued run must find the hpc checkpoint of the preempted one.
root_dir=${CAPSDIST_ROOT_DIR:-runs/${SLURM_JOB_NAME}}
echo "capsdist: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s), root ${root_dir}"
srun --kill-on-bad-exit=1 "${CAPSDIST_PYTHON:-python}" -m capsdist.train fit --config "${config}" \
  --trainer.num_nodes="${SLURM_NNODES}" --trainer.devices="${SLURM_NTASKS_PER_NODE}" \
  --trainer.default_root_dir="${root_dir}" "$@"
