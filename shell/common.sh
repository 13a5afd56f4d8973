# Helpers shared by shell/launch.sh and eval/evaluate.sh (POSIX sh, sourced). The sourcing script sets PROG, the
# name its error messages start with, and REPO, the repository root.

die() {
    echo "${PROG:-$0}: error: $*" >&2
    exit 2
}

is_count() {  # a positive decimal integer
    case $1 in '' | *[!0-9]* | 0*) return 1 ;; esac
    return 0
}

check_count() {  # check_count NAME VALUE
    is_count "$2" || die "$1 must be a positive integer, got '$2'"
}

count_visible_gpus() {  # GPUs torchrun would see here (0 on a machine without an NVIDIA GPU)
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        [ -z "$CUDA_VISIBLE_DEVICES" ] && { echo 0; return; }
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU'
    else  # no nvidia-smi on PATH: count the device nodes (no glob: callers may run with set -f)
        ls /dev 2>/dev/null | grep -c '^nvidia[0-9][0-9]*$'
    fi
}

find_python() {  # PYTHON if set, else the repository's .venv when it exists, else python (python3)
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x "$REPO/.venv/bin/python" ]; then
        echo "$REPO/.venv/bin/python"
    elif command -v python >/dev/null 2>&1; then
        echo python
    else
        echo python3
    fi
}
