"""What our programs print, kept to what a user acts on: third-party warnings that need no action are silenced here,
in one table (QUIET), and the ones a user may act on are said in one line of ours (EXPLAIN).

Every entry point calls :func:`install` first (check_data, chat, eval, tools/make_tiny_model.py at the top of main;
finetune before its own imports when run as a program, as bitsandbytes warns while transformers' trainer utilities
load); nothing happens at import. Each entry is matched by its message and the logger or module it comes from, so any
other warning of the same library still shows. A new warning seen in a default run is either fixed where it is ours,
added here with the reason it is harmless, or explained; tests/test_console.py fails on any warning line not
accounted for. `number_step_lines` starts each line the Trainer prints with the step ("step 12/400 {...}").

QUIET (message -- where it comes from -- why it is harmless):

- "Failed to load CPU gemm_4bit_forward from kernels-community" -- bitsandbytes (logger
  bitsandbytes.backends.cpu.ops), on import through peft, on CPUs with AVX512-BF16 when the optional `kernels` package
  is missing. Only 4-bit (QLoRA) matmuls on CPU use that kernel, and they fall back to bitsandbytes' own code.
- "Setting accelerator to CPU. If you have GPU ..." -- DeepSpeed (logger DeepSpeed), whenever torch sees no CUDA
  device. The launcher already says "no GPU visible" and the run's summary names the device ("device cpu (gloo)").
- "OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at N" -- accelerate (UserWarning from accelerate.state) on a CPU
  run: it reports its own default of one thread per physical core of the process's share; nothing is wrong.
- "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has N" -- accelerate
  (logger accelerate.accelerator) on every DeepSpeed run with accumulation: transformers sets 1 on purpose (the
  Trainer accumulates itself) and the DeepSpeed value it keeps is ours (--gradient_accumulation_steps, "auto" in the
  shipped configs).

EXPLAIN (said once per process, in our words, instead of the library's repeated text):

- torch's DataLoader "This DataLoader will create N worker processes in total. Our suggested max number of worker in
  current system is M" (UserWarning from torch.utils.data.dataloader, once per loader and epoch): actionable, so it
  stays, as one line naming the flag to lower.

Not silenceable from Python and therefore avoided at the source: torch's C++ DDP note "find_unused_parameters=True
was specified in DDP constructor, but did not find any unused parameters" (pass --ddp_find_unused_parameters False
when every trainable parameter takes part in each step, as in the demo).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Quiet:
    """One third-party message that needs no action: `source` is a logger name (kind "logger") or the module a
    Python warning is issued from (kind "warning"); `message` a regular expression matched at the start."""

    kind: str
    source: str
    message: str
    why: str


QUIET = (
    Quiet("logger", "bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
          "only CPU 4-bit matmuls use it, and they fall back to bitsandbytes' own code"),
    Quiet("logger", "DeepSpeed", r"Setting accelerator to CPU\.",
          "no CUDA device: the launcher and the run summary already name the CPU"),
    Quiet("warning", "accelerate.state", r"OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at \d+",
          "accelerate reports its own thread default on CPU"),
    Quiet("logger", "accelerate.accelerator",
          r"Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has \d+",
          "transformers accumulates itself (1 on purpose); DeepSpeed keeps our --gradient_accumulation_steps"),
)


@dataclass(frozen=True)
class Explain:
    """One actionable third-party warning, said once in our words (`say` is formatted with the match's groups)."""

    source: str
    message: str
    say: str


EXPLAIN = (
    Explain("torch.utils.data.dataloader",
            r"This DataLoader will create (\d+) worker processes in total\. Our suggested max number of worker in "
            r"current system is (\d+)",
            "warning: {0} data loader workers per process but {1} CPUs for it here: loading may stall; lower "
            "--dataloader_num_workers (the launchers pass the official 4)"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        # accelerate's logger adapter puts "[RANK n] " before the message
        self.pattern = re.compile(r"(?:\[RANK \d+\] )?(?:" + "|".join(f"(?:{p})" for p in patterns) + ")")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.match(record.getMessage())
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True


_installed = False


def install() -> None:
    """Silence the QUIET messages and shorten the EXPLAIN ones for this process (idempotent). Call it before the
    imports that print them: bitsandbytes warns while transformers' trainer utilities are imported."""
    global _installed
    if _installed:
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for quiet in QUIET:
        if quiet.kind == "logger":
            by_logger.setdefault(quiet.source, []).append(quiet.message)
        else:
            warnings.filterwarnings("ignore", message=quiet.message, module=re.escape(quiet.source))
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    _explain_warnings()
    logging.getLogger(__name__).debug("%d third-party messages silenced, %d explained (internvl_chat/console.py)",
                                      len(QUIET), len(EXPLAIN))


def _explain_warnings() -> None:
    """Route the EXPLAIN warnings through one line of ours, printed once per process; others show as before."""
    original = warnings.showwarning
    said: set[int] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        for index, entry in enumerate(EXPLAIN):
            match = re.match(entry.message, text)
            if match and entry.source.replace(".", "/") in filename.replace("\\", "/"):
                if index not in said:
                    said.add(index)
                    print(entry.say.format(*match.groups()), file=file or sys.stderr, flush=True)
                return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def step_line(state, logs: dict) -> str:
    """One Trainer log entry as printed: "step 12/400 {...}", the values as transformers shows them (4 digits)."""
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
    of = f"/{state.max_steps}" if state.max_steps and state.max_steps > 0 else ""
    return f"step {state.global_step}{of} {shown}"


def number_step_lines(trainer) -> None:
    """Swap the Trainer's printing callback for one that starts each line with the step (see `step_line`), so every
    printed line says where in the run it is. What trainer_state.json and tensorboard receive is unchanged."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class NumberedProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(step_line(state, logs or {}))

    class NumberedPrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero:
                print(step_line(state, logs or {}))

    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is ProgressCallback:
            trainer.remove_callback(callback)
            trainer.add_callback(NumberedProgress(max_str_len=callback.max_str_len))
        elif type(callback) is PrinterCallback:
            trainer.remove_callback(callback)
            trainer.add_callback(NumberedPrinter())
