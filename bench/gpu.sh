#!/usr/bin/env bash
# Every benchmark of bench/ on CUDA, unattended: writes the GPU part of BENCHMARKS.md (`bench/run.py --device cuda`
# replaces only the part between <!-- gpu:begin --> and <!-- gpu:end -->; the CPU sections stay as they are).
#
#   bash bench/gpu.sh                    # -> BENCHMARKS.md at the repository root
#   bash bench/gpu.sh /tmp/gpu.md        # another file (created with a header when missing)
#   QUICK=1 bash bench/gpu.sh            # smoke sizes (under a minute per section)
#   ONLY=training,generation bash bench/gpu.sh
#   PYTHON=/opt/conda/bin/python bash bench/gpu.sh
#
# Python: $PYTHON, else the repository's .venv, else `make venv` creates it as the README describes (that needs the
# network, and pip must resolve torch==2.13.0 to a CUDA build there: on a machine whose default wheel is the CPU
# one, give PYTHON a CUDA torch instead). bf16 is what the sections use on CUDA; flash-attention 2 is used when the
# flash-attn package is importable (`pip install flash-attn --no-build-isolation`, requirements/gpu.txt), SDPA
# otherwise. The sections run in one process on the first visible GPU; the GPU count is reported here and in the file.
# TIMEOUT (seconds, default 1800) stops a hung run; the log goes next to the output file.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-BENCHMARKS.md}
if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  echo "==> no .venv here: creating it (make venv)"
  make venv
  py=.venv/bin/python
fi

echo "==> python: $py"
if ! "$py" - <<'EOF'
import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"this python's torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no GPU: "
             "run on a CUDA machine, or give PYTHON= a python with a CUDA build of torch")
count = torch.cuda.device_count()
print(f"==> {count} GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
      + ", ".join(torch.cuda.get_device_name(k) for k in range(count)))
print(f"==> torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}, "
      f"flash-attn {'installed' if importlib.util.find_spec('flash_attn') else 'not installed (SDPA)'}")
if count > 1:
    print("==> the benchmarks run on one GPU (cuda:0); the count above is recorded for the reader")
EOF
then
  exit 1
fi

args=(bench/run.py --device cuda --out "$out")
[[ -n "${QUICK:-}" ]] && args+=(--quick)
[[ -n "${ONLY:-}" ]] && args+=(--only "$ONLY")
log="${out%.md}-gpu.log"
echo "==> $py ${args[*]}  (log: $log)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set +e
timeout "${TIMEOUT:-1800}" "$py" "${args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -eq 124 ]]; then
  echo "==> stopped after ${TIMEOUT:-1800} s (TIMEOUT); nothing was written" >&2
elif [[ $rc -eq 0 ]]; then
  echo "==> GPU results: $(cd "$(dirname "$out")" && pwd)/$(basename "$out") (its GPU part), log: $log"
else
  echo "==> some section failed (exit $rc); the file still has the others: $out, log: $log" >&2
fi
exit $rc
