#!/bin/sh
# The one launcher behind every shell/*/2nd_finetune/*.sh script: they set a few variables and pass their
# model-specific flags here; everything common (batch arithmetic, torchrun vs srun, logging, the official
# 2nd-finetune flags) lives in this file so a fix lands once. Run from the repository root, like the official
# scripts are run from internvl_chat/:
#
#   GPUS=8 PER_DEVICE_BATCH_SIZE=1 sh shell/internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_full.sh
#   PARTITION=gpu GPUS=16 sh shell/internvl2.5/2nd_finetune/internvl2_5_38b_dynamic_res_2nd_finetune_full.sh
#   GPUS=1 BATCH_SIZE=2 sh shell/.../x_lora.sh --max_steps 10 --bf16 False    # extra flags pass through, last wins
#
# Environment (defaults in brackets; a per-model script sets BATCH_SIZE, PER_DEVICE_BATCH_SIZE, MODEL and
# OUTPUT_DIR to the official values, and DEFAULT_GPUS / DEFAULT_DEEPSPEED, used when GPUS / DEEPSPEED are unset):
#   GPUS [DEFAULT_GPUS, else 1]  processes to start. torchrun: per node (total = GPUS x NNODES). srun: in total.
#                           torchrun with no GPU visible (or USE_GPU=0) and GPUS unset: 1 CPU process (gloo).
#   BATCH_SIZE              global batch [PER_DEVICE_BATCH_SIZE x all processes]; must be a multiple of
#                           PER_DEVICE_BATCH_SIZE x all processes: GRADIENT_ACC = BATCH_SIZE / that.
#   PER_DEVICE_BATCH_SIZE [1]
#   MODEL                   checkpoint to fine-tune (a local folder; this script downloads nothing).
#   OUTPUT_DIR [work_dirs/finetune]  created if needed; the log is appended to OUTPUT_DIR/training_log.txt.
#                           A run there with the same settings is resumed (or said complete); one with other
#                           settings is refused before anything starts (README: the run-folder contract).
#                           An --output_dir among the extra flags wins, for the log too.
#   META_PATH [./shell/data/internvl_1_2_finetune_custom.json]   your data (format: shell/data/example_finetune.json).
#   DEEPSPEED [DEFAULT_DEEPSPEED, else none]  DeepSpeed config (zero_stage1_config.json, ...); "none" for plain
#                           DDP. On a CPU run it is none unless set: DeepSpeed first compiles its CPU ops (~3 min).
#                           META_PATH and DEEPSPEED are read relative to the current directory, else to the
#                           repository root.
#   torchrun only:  NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [34229]. For several nodes
#                   run the same command on every node with its NODE_RANK (or use shell/slurm/finetune.sbatch).
#   srun (when PARTITION is set): GPUS_PER_NODE [min(GPUS, 8)], CPUS_PER_TASK [10], QUOTA_TYPE [unset],
#                   SRUN_ARGS [""] (extra srun options). One task per GPU, NODES = GPUS / GPUS_PER_NODE.
#   USE_GPU [auto]          1: GPU run (srun asks for --gres=gpu:GPUS_PER_NODE); 0: CPU only (no --gres;
#                           torchrun hides the GPUs). auto: srun asks sinfo whether PARTITION has GPUs (and
#                           assumes it does when sinfo cannot tell); torchrun uses the GPUs it finds.
#   PYTHON [.venv/bin/python of the repository when it exists, else python]  interpreter; torchrun is run as
#                           `$PYTHON -m torch.distributed.run`. The start-up line names it.

PROG=shell/launch.sh
REPO=$(cd "$(dirname "$0")/.." && pwd) || { echo "$PROG: error: cannot find the repository root from $0" >&2; exit 2; }
. "$REPO/shell/common.sh"  # die, is_count, check_count, count_visible_gpus, find_python

quote() {  # one argument, quoted for a copy-pasteable command line
    case $1 in
        '' | *[!A-Za-z0-9_./:=,@+%-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

set -f  # SRUN_ARGS is split into words on purpose; never glob it

PYTHON=$(find_python)
command -v "$PYTHON" >/dev/null 2>&1 ||
    die "PYTHON=$PYTHON not found: set PYTHON to an interpreter with this project installed"
NOTES=  # one line each about a default chosen for this machine, printed with the start-up line
note() {
    NOTES="$NOTES==> $*
"
}

PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-34229}
USE_GPU=${USE_GPU:-auto}
META_PATH=${META_PATH:-./shell/data/internvl_1_2_finetune_custom.json}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/finetune}
take_next=
for arg in "$@"; do  # an --output_dir flag wins over OUTPUT_DIR (the trainer takes the last one too)
    if [ -n "$take_next" ]; then OUTPUT_DIR=$arg; take_next=; continue; fi
    case $arg in
        --output_dir) take_next=1 ;;
        --output_dir=*) OUTPUT_DIR=${arg#--output_dir=} ;;
    esac
done
[ -n "${MODEL:-}" ] || die "MODEL is not set: point it at the InternVL checkpoint to fine-tune (a local folder)"
check_count PER_DEVICE_BATCH_SIZE "$PER_DEVICE_BATCH_SIZE"
case $USE_GPU in auto | 0 | 1) ;; *) die "USE_GPU must be auto, 1 or 0, got '$USE_GPU'" ;; esac

# ---- GPU or CPU, then how many processes: on CPU without GPUS, one (not the script's 8 GPU processes) ----
ON_CPU=
if [ -n "${PARTITION:-}" ]; then
    if [ "$USE_GPU" = 0 ]; then
        ON_CPU="USE_GPU=0"
    elif [ "$USE_GPU" = auto ]; then
        gres=$(sinfo -h -p "$PARTITION" -o %G 2>/dev/null) || gres=unknown
        case $gres in
            *gpu* | unknown | '') USE_GPU=1 ;;
            *) USE_GPU=0 ON_CPU="partition $PARTITION has no GPU" ;;
        esac
    fi
    GPUS=${GPUS:-${DEFAULT_GPUS:-1}}  # srun: GPUS counts tasks on the cluster, not on this machine
else
    if [ "$USE_GPU" = 0 ]; then
        found=0
        ON_CPU="USE_GPU=0"
    else
        found=$(count_visible_gpus)
        if [ "${found:-1}" = 0 ]; then
            [ "$USE_GPU" = 1 ] && die "USE_GPU=1 but no GPU is visible here"
            ON_CPU="no GPU visible"
        fi
    fi
    if [ -n "${GPUS:-}" ]; then
        :
    elif [ -n "$ON_CPU" ]; then
        GPUS=1
        note "$ON_CPU: 1 CPU process (set GPUS=N for more)"
    else
        GPUS=${DEFAULT_GPUS:-1}
    fi
fi
check_count GPUS "$GPUS"

# ---- how many processes, and the gradient accumulation that keeps the global batch ----
if [ -n "${PARTITION:-}" ]; then
    LAUNCH=srun
    if [ -z "${GPUS_PER_NODE:-}" ]; then
        GPUS_PER_NODE=$((GPUS < 8 ? GPUS : 8))
    fi
    check_count GPUS_PER_NODE "$GPUS_PER_NODE"
    CPUS_PER_TASK=${CPUS_PER_TASK:-10}
    check_count CPUS_PER_TASK "$CPUS_PER_TASK"
    [ $((GPUS % GPUS_PER_NODE)) -eq 0 ] ||
        die "GPUS=$GPUS is not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE (srun runs GPUS_PER_NODE tasks on each of GPUS / GPUS_PER_NODE nodes): change GPUS or GPUS_PER_NODE"
    NODES=$((GPUS / GPUS_PER_NODE))
    WORLD=$GPUS
    WORLD_TEXT="GPUS=$GPUS"
else
    LAUNCH=torchrun
    check_count NNODES "$NNODES"
    case $NODE_RANK in '' | *[!0-9]*) die "NODE_RANK must be 0 .. NNODES-1, got '$NODE_RANK'" ;; esac
    [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
    WORLD=$((GPUS * NNODES))
    if [ "$NNODES" -eq 1 ]; then WORLD_TEXT="GPUS=$GPUS"; else WORLD_TEXT="GPUS=$GPUS x NNODES=$NNODES"; fi
fi
PER_STEP=$((PER_DEVICE_BATCH_SIZE * WORLD))
BATCH_SIZE=${BATCH_SIZE:-$PER_STEP}
check_count BATCH_SIZE "$BATCH_SIZE"
if [ "$BATCH_SIZE" -lt "$PER_STEP" ]; then
    die "BATCH_SIZE=$BATCH_SIZE is smaller than PER_DEVICE_BATCH_SIZE=$PER_DEVICE_BATCH_SIZE x $WORLD_TEXT = $PER_STEP samples per step (GRADIENT_ACC would be 0): raise BATCH_SIZE to $PER_STEP or more, or lower PER_DEVICE_BATCH_SIZE or GPUS"
fi
if [ $((BATCH_SIZE % PER_STEP)) -ne 0 ]; then
    lower=$((BATCH_SIZE / PER_STEP * PER_STEP))
    die "BATCH_SIZE=$BATCH_SIZE is not a multiple of PER_DEVICE_BATCH_SIZE=$PER_DEVICE_BATCH_SIZE x $WORLD_TEXT = $PER_STEP (GRADIENT_ACC would not be a whole number): set BATCH_SIZE to $lower or $((lower + PER_STEP)), or change PER_DEVICE_BATCH_SIZE or GPUS"
fi
GRADIENT_ACC=$((BATCH_SIZE / PER_STEP))

# ---- DeepSpeed: off on CPU unless asked for; its CPU ops compile once, silently, for minutes ----
if [ -z "${DEEPSPEED:-}" ]; then
    DEEPSPEED=${DEFAULT_DEEPSPEED:-none}
    if [ -n "$ON_CPU" ] && [ "$DEEPSPEED" != none ]; then
        note "$ON_CPU: DeepSpeed off, plain DDP (DEEPSPEED=$DEEPSPEED to use it; on CPU it first compiles ops, ~3 min)"
        DEEPSPEED=none
    fi
elif [ -n "$ON_CPU" ] && [ "$DEEPSPEED" != none ]; then
    ext_dir=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}
    built=$(find "$ext_dir" \( -name 'cpu_adam*.so' -o -name 'deepspeed_shm_comm*.so' \) 2>/dev/null | wc -l)
    if [ "$built" -lt 2 ]; then
        note "$ON_CPU, DEEPSPEED=$DEEPSPEED: DeepSpeed first compiles its CPU ops, once (about 3 minutes; kept in" \
            "$ext_dir)"
    fi
fi

# ---- files: as given (relative to here, as officially), else relative to the repository root ----
case $DEEPSPEED in
    none) DEEPSPEED= ;;
    *)
        if [ ! -f "$DEEPSPEED" ]; then
            [ -f "$REPO/$DEEPSPEED" ] ||
                die "DeepSpeed config '$DEEPSPEED' not found (set DEEPSPEED to a config file, or DEEPSPEED=none)"
            DEEPSPEED=$REPO/$DEEPSPEED
        fi
        ;;
esac
if [ ! -f "$META_PATH" ]; then
    [ -f "$REPO/$META_PATH" ] ||
        die "META_PATH=$META_PATH not found: point META_PATH at the meta JSON of your data (format: shell/data/example_finetune.json)"
    META_PATH=$REPO/$META_PATH
fi
if [ ! -d "$MODEL" ]; then
    [ -d "$REPO/$MODEL" ] || die "MODEL=$MODEL is not a local folder. Training never downloads: fetch the checkpoint first \
(e.g. huggingface-cli download OpenGVLab/$(basename "$MODEL") --local-dir pretrained/$(basename "$MODEL")) and set MODEL to that folder"
    MODEL=$REPO/$MODEL
fi

# ---- GPUs for the launch ----
if [ "$LAUNCH" = srun ]; then
    GRES=
    [ "$USE_GPU" = 1 ] && GRES=--gres=gpu:$GPUS_PER_NODE
elif [ "$USE_GPU" = 0 ]; then
    export CUDA_VISIBLE_DEVICES=
elif [ -n "$found" ] && [ "$found" -gt 0 ] && [ "$GPUS" -gt "$found" ]; then
    die "GPUS=$GPUS but this node has $found GPU(s). With torchrun GPUS counts the GPUs of one node: use GPUS=$found with NNODES/NODE_RANK/MASTER_ADDR on each node, or PARTITION=<partition> to launch with srun"
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_PORT
export TF_CPP_MIN_LOG_LEVEL=3
if [ "$LAUNCH" = torchrun ] && [ "$GPUS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=1  # what torchrun sets for several processes anyway, without its 4-line banner
fi
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"  # the log is a pipe to tee: show lines as they come

if [ "$LAUNCH" = torchrun ] && [ "$NODE_RANK" -ne 0 ]; then
    LOG_FILE=$OUTPUT_DIR/training_log_node$NODE_RANK.txt  # nodes sharing a file system do not interleave
else
    LOG_FILE=$OUTPUT_DIR/training_log.txt
fi

# ---- the command: launcher, the official flags every 2nd-finetune script passes, then "$@" (last wins) ----
# Not passed on purpose: --overwrite_output_dir True (the official scripts turn resuming off with it; here it starts
# over after moving the old run aside).
set -- \
    --model_name_or_path "$MODEL" \
    --output_dir "$OUTPUT_DIR" \
    --meta_path "$META_PATH" \
    --force_image_size 448 \
    --down_sample_ratio 0.5 \
    --vision_select_layer -1 \
    --dataloader_num_workers 4 \
    --bf16 True \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRADIENT_ACC" \
    --evaluation_strategy no \
    --save_strategy steps \
    --save_steps 200 \
    --save_total_limit 1 \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --do_train True \
    --grad_checkpoint True \
    --group_by_length True \
    --dynamic_image_size True \
    --use_thumbnail True \
    --ps_version v2 \
    --report_to tensorboard \
    ${DEEPSPEED:+--deepspeed "$DEEPSPEED"} \
    "$@"

# ---- preflight, one process, before anything is written: flags, model folder, meta file, a structural pass over
# every record, and the run-folder contract (resume / refuse changed settings / a complete run / start over after
# moving the old run aside). Exit 3: the run in OUTPUT_DIR is complete, nothing to do. ----
preflight_out=$(mktemp "${TMPDIR:-/tmp}/internvl_preflight.XXXXXX") || die "mktemp failed"
preflight_err=$preflight_out.err
if [ "$LAUNCH" = srun ]; then first_rank=0; else first_rank=$((NODE_RANK * GPUS)); fi
RANK=$first_rank WORLD_SIZE=$WORLD "$PYTHON" -m internvl_chat.finetune --preflight "$@" >"$preflight_out" \
    2>"$preflight_err"
rc=$?
cat "$preflight_out"
cat "$preflight_err" >&2
cat "$preflight_err" >>"$preflight_out"  # for the log
rm -f "$preflight_err"
if [ "$rc" -ne 0 ]; then
    rm -f "$preflight_out"
    [ "$rc" -eq 3 ] && exit 0
    exit "$rc"
fi
mkdir -p "$OUTPUT_DIR" || die "cannot create OUTPUT_DIR=$OUTPUT_DIR"
export INTERNVL_CHAT_PREFLIGHT_DONE=1  # the training processes skip the data pass the preflight made

if [ "$LAUNCH" = srun ]; then
    # shellcheck disable=SC2086  # GRES and SRUN_ARGS are word lists
    set -- srun -p "$PARTITION" $GRES --nodes="$NODES" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
        --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${QUOTA_TYPE:+--quotatype="$QUOTA_TYPE"} \
        ${SRUN_ARGS:-} "$PYTHON" -u -m internvl_chat.finetune "$@"
else
    set -- "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
        --master_addr="$MASTER_ADDR" --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" \
        -m internvl_chat.finetune "$@"
fi

command_line=
for arg in "$@"; do command_line="$command_line${command_line:+ }$(quote "$arg")"; done
{
    echo "==> $(date '+%Y-%m-%d %H:%M:%S') $LAUNCH: $WORLD process(es) x $PER_DEVICE_BATCH_SIZE per device x $GRADIENT_ACC accumulation = global batch $BATCH_SIZE; python: $PYTHON"
    printf '%s' "$NOTES"
    echo "==> $command_line"
} | tee -a "$LOG_FILE"
cat "$preflight_out" >>"$LOG_FILE"  # shown above already
rm -f "$preflight_out"

# POSIX sh has no pipefail: keep the trainer's exit status in a file, not tee's.
status_file=$(mktemp "${TMPDIR:-/tmp}/internvl_launch.XXXXXX") || die "mktemp failed"
{ "$@" 2>&1 && echo 0 >"$status_file" || echo $? >"$status_file"; } | console_and_log "$LOG_FILE"  # common.sh
rc=$(cat "$status_file")
rm -f "$status_file"
[ "$rc" = 0 ] || echo "shell/launch.sh: training exited with status $rc (log: $LOG_FILE)" >&2
exit "$rc"
