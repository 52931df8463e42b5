#!/usr/bin/env bash
# Launch one experiment sweep (conf/experiment/NAME.yaml), then build its report.
#
#   experiments/launch.sh NAME [hydra overrides ...]
#
# Environment:
#   LAUNCHER   basic (default: jobs one after another in this process) | local_parallel (joblib)
#              | slurm (a SLURM job array through submitit) | slurm_local (the SLURM code path on
#              this machine)
#   SWEEP_DIR  where the jobs go (default: the experiment's own outputs/sweeps/NAME); relaunching
#              with the same dir skips finished jobs and redoes failed ones
#   PY         the Python to use (default: .venv/bin/python)
#
# The exit status is the sweep's: non-zero when a job failed (sweep_summary.json lists them); the
# report is built in any case from the jobs that finished.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  echo "usage: $0 NAME [overrides ...]   (NAME: one of $(ls conf/experiment | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
  exit 2
fi
name=$1
shift
PY=${PY:-.venv/bin/python}
LAUNCHER=${LAUNCHER:-basic}
SWEEP_DIR=${SWEEP_DIR:-outputs/sweeps/$name}

args=(-m gblm -m "experiment=$name" "hydra.sweep.dir=$SWEEP_DIR")
if [[ $LAUNCHER != basic ]]; then
  args+=("hydra/launcher=$LAUNCHER")
fi

"$PY" "${args[@]}" "$@"
status=$?
if [[ -d $SWEEP_DIR ]]; then
  "$PY" -m gblm.report "$SWEEP_DIR" || echo "report: python -m gblm.report $SWEEP_DIR failed" >&2
fi
exit "$status"
