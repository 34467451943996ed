#!/usr/bin/env bash
# The commands behind a table as a SLURM job array: task i runs the i-th command of one stage of
# `python summarize.py grid NAME`. Every command has --resume, so a requeued or preempted task
# continues from its last checkpoint (a finished run does nothing). Teachers run before students:
#
#   T=$(sbatch --parsable --array=0-$(( $(python summarize.py grid laptop --stage teachers --count) - 1 )) \
#         slurm_grid.sh laptop teachers)
#   sbatch --dependency=afterok:$T --array=0-$(( $(python summarize.py grid laptop --stage students --count) - 1 )) \
#         slurm_grid.sh laptop students
#
#   DRY=1 bash slurm_grid.sh laptop students     # print what each task would run; runs nothing
#
# Submit from the repository root (SLURM starts the tasks there). Per-task resources: one CPU core is
# what the laptop table's runs used; for GPU grids add e.g. --gres=gpu:1 and change --gpus in the grid.
#SBATCH --job-name=okd-grid
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
name=${1:?usage: slurm_grid.sh GRID STAGE (e.g. laptop students)}
stage=${2:?usage: slurm_grid.sh GRID STAGE (teachers or students)}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ -n "${DRY:-}" ]; then
  python summarize.py grid "$name" --stage "$stage" | awk '{ print "task " NR - 1 ": " $0 }'
  exit "${PIPESTATUS[0]}"
fi
cmd=$(python summarize.py grid "$name" --stage "$stage" --index "${SLURM_ARRAY_TASK_ID:?not a SLURM array task (DRY=1 prints the commands)}")
echo "task $SLURM_ARRAY_TASK_ID on $(hostname): $cmd"
exec $cmd
