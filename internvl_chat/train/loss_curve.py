"""The loss curve of a run as a PNG, from the `trainer_state.json` the Trainer writes next to the checkpoint.

Training loss per logged step, and every `eval_<set>_loss` the run logged (``--eval_meta_path``) on the same axes, so
over-fitting shows as the two curves parting. matplotlib draws off-screen (Agg); nothing is shown.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_loss_history(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss), ...], "eval_<set>": [...]} from `run_dir/trainer_state.json`."""
    state_file = Path(run_dir) / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: is {run_dir} the output folder of a finished run?")
    history = json.loads(state_file.read_text()).get("log_history", [])
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            curves.setdefault("train", []).append((step, float(entry["loss"])))
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss") and isinstance(value, (int, float)):
                curves.setdefault(key[: -len("_loss")], []).append((step, float(value)))
    if not curves.get("train"):
        raise ValueError(f"{state_file} holds no training loss (was --logging_steps larger than the run?)")
    return curves


def plot_loss_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curve of `run_dir` to `out` (default `run_dir/loss_curve.png`); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; a backend the caller already chose stays
    import matplotlib.pyplot as plt

    curves = read_loss_history(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "loss_curve.png"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for name, points in curves.items():
            steps, losses = zip(*points)
            style = "-" if name == "train" else "o--"
            ax.plot(steps, losses, style, label=name.replace("eval_", "eval ") + " loss", markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        run = Path(run_dir).resolve()
        ax.set_title(f"{run.parent.name}/{run.name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
