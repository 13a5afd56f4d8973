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

# console_and_log LOG_FILE: a training run's output (stdin) to the console, and to LOG_FILE (appended) as complete
# lines only. Progress bars redraw a line with carriage returns; the log keeps the last state of such a line and
# drops bar fragments (a bar cleared for a printed line leaves just that line). The console gets every line as it
# came, and the bar's state after a line printed under it, so the bar stays in view between steps.
# torchrun's failure box is left out when our process already said what went wrong in one line: a child exit code
# of 2 (a user error) or of 1 with no Python traceback before it (a data verdict or a full disk, one line each). A
# crash (a traceback, a signal, any other exit code) keeps the box. A shell loop rather than awk: awk implementations
# differ in when they read a pipe (mawk waits for a full buffer), and a run's console must not lag.
console_and_log() {
    _cr=$(printf '\r')
    _esc=$(printf '\033')
    _bar= _drop= _box= _rules=0 _traceback= _held=
    while IFS= read -r _line || [ -n "$_line" ]; do
        if [ -n "$_drop" ]; then  # inside torchrun's box: it ends with the second rule after ChildFailedError
            case $_line in
                *ChildFailedError*) _box=1 ;;
                =*=) [ -n "$_box" ] && _rules=$((_rules + 1)) && [ "$_rules" -ge 2 ] && _drop= ;;
            esac
            continue
        fi
        case $_line in  # torchrun stopping the other processes: held, and left out with the box that follows
            *"] Sending process "*" closing signal "*) _held="$_held$_line
" && continue ;;
            *"failed (exitcode: 2) local_rank: "*) _drop=1 _box= _rules=0 _held= && continue ;;
            *"failed (exitcode: 1) local_rank: "*) [ -z "$_traceback" ] && _drop=1 _box= _rules=0 _held= && continue ;;
            *"Traceback (most recent call last)"*) _traceback=1 ;;
        esac
        [ -z "$_held" ] || { printf '%s' "$_held" && printf '%s' "$_held" >&3 && _held=; }
        # console: the line as it came, after a re-shown bar is ended
        case $_line in "$_cr"*) ;; *) [ -n "$_bar" ] && printf '\n' ;; esac
        printf '%s\n' "$_line"
        _bar=
        case $_line in  # "...<bar>\r<spaces>\r<text>": a line printed under a bar, which is redrawn after it
            *"$_cr"*"$_cr"*)
                _head=${_line%"$_cr"*}
                case ${_head##*"$_cr"} in
                    *[![:space:]]*) ;;
                    *) _bar=${_head%"$_cr"*} _bar=${_bar##*"$_cr"}
                       case $_bar in *[![:space:]]*) printf '\r%s' "$_bar" ;; *) _bar= ;; esac ;;
                esac ;;
        esac
        # log: the last segment that is not blank, without terminal escapes; a line of bar fragments only: nothing
        _text=$_line
        case $_text in
            *"$_cr"*)
                while :; do
                    case ${_text##*"$_cr"} in *[![:space:]]*) _text=${_text##*"$_cr"} && break ;; esac
                    case $_text in *"$_cr"*) _text=${_text%"$_cr"*} ;; *) _text= && break ;; esac
                done
                [ -n "$_text" ] || continue
                ;;
        esac
        case $_text in *"$_esc"*) _text=$(printf '%s\n' "$_text" | sed "s/$_esc\\[[0-9;]*[A-Za-z]//g") ;; esac
        printf '%s\n' "$_text" >&3
    done 3>>"$1"
    [ -z "$_held" ] || { printf '%s' "$_held" && printf '%s' "$_held" >>"$1"; }
    [ -z "$_bar" ] || printf '\n'
}
