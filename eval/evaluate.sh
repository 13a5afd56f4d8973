#!/bin/sh
# Evaluate a checkpoint, called as the official internvl_chat/evaluate.sh is:
#
#   GPUS=8 sh eval/evaluate.sh MODEL DATASET [--dynamic] [--max-num N] [--out-dir DIR] [--limit N] [...]
#
#   MODEL    checkpoint folder (relative to here, else to the repository root; or absolute)
#   DATASET  a benchmark key as in the official script (vqa-textvqa-val, vqa-docvqa-val, vqa-chartqa-test,
#            vqa-chartqa-test-human, vqa-infovqa-val, refcoco, refcoco-val, refcoco+-testA, refcocog-test, pope,
#            mme, mmbench-dev-en, ...; or the official names textvqa_val, infographicsvqa_val, ...) whose files
#            sit under data/ in the official layout, or the path of your own eval JSONL (training format).
#   Other flags go to eval/evaluate.py (python -m eval.evaluate --help lists them).
#
# Environment (defaults in brackets):
#   GPUS [1]            processes (torchrun, one per GPU; CPU processes with gloo when there is no GPU).
#                       GPUS=1 runs one plain python process.
#   MASTER_PORT [63669] torchrun's port (the official default); MASTER_ADDR [127.0.0.1].
#   PYTHON [.venv]      interpreter (default: the repository's .venv/bin/python, else python on PATH); torchrun
#                       is run as `$PYTHON -m torch.distributed.run`.
#
# Results: results/<model>/<dataset>/predictions.jsonl and metrics.json (or --out-dir); an existing result is
# never overwritten unless --overwrite is given.

PROG=eval/evaluate.sh
REPO=$(cd "$(dirname "$0")/.." && pwd) || { echo "$PROG: error: cannot find the repository root from $0" >&2; exit 2; }
. "$REPO/shell/common.sh"  # die, is_count, check_count, count_visible_gpus, find_python

PYTHON=$(find_python)  # PYTHON, else the repository's .venv, else python on PATH
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found"
GPUS=${GPUS:-1}
MASTER_PORT=${MASTER_PORT:-63669}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

[ $# -ge 2 ] || die "usage: [GPUS=N] sh eval/evaluate.sh MODEL DATASET [--dynamic] [--max-num N] [--out-dir DIR] [...]"
MODEL=$1
DATASET=$2
shift 2
check_count GPUS "$GPUS"
is_count "$MASTER_PORT" || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"

if [ ! -d "$MODEL" ]; then
    [ -d "$REPO/$MODEL" ] || die "MODEL=$MODEL is not a folder: give a local checkpoint folder (nothing is downloaded)"
    MODEL=$REPO/$MODEL
fi
MODEL=$(cd "$MODEL" && pwd)  # absolute, as the official script makes it

if [ "$GPUS" -gt 1 ]; then
    found=$(count_visible_gpus)
    if [ "${found:-0}" -gt 0 ] && [ "$GPUS" -gt "$found" ]; then
        die "GPUS=$GPUS but $found GPU(s) are visible here"
    fi
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

if [ "$GPUS" -eq 1 ]; then
    exec "$PYTHON" -m eval.evaluate "$MODEL" "$DATASET" "$@"
fi
# Check the inputs once, in one process, so a mistake is reported once and before any model loads.
"$PYTHON" -m eval.evaluate --check-only "$MODEL" "$DATASET" "$@" || exit $?
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" -m eval.evaluate "$MODEL" "$DATASET" "$@"
