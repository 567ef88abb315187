"""``RUN_DIR/metrics.png``: a run's curves, the ones that say whether it works first.

Key panels come first in a fixed order (reward and held-out accuracy, loss, clip fraction, KL,
tokens per step, the time split of a step, then gradient norm, learning rate and throughput);
every other numeric metric follows alphabetically. A panel is on a log scale only when its
values are positive and span over 100x (an SFT loss; a DiPO loss, of either sign, stays linear). Series that never change
(e.g. ``micro_batches``) are left out. Each series is drawn faint as recorded, with a moving
average over it when it is long enough to be noisy. Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from dirl_jax.metrics import read_metrics

KEY_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward_mean", "rollout_accuracy")),
    ("held-out accuracy", ("eval_accuracy",)),
    ("loss", ("loss",)),
    ("clip fraction", ("clip_fraction",)),
    ("KL to the reference", ("kl",)),
    ("tokens per step", ("eval_tokens_per_step",)),
    ("time per step (s)", ("rollout_s", "reward_s", "train_s", "weight_sync_s")),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
    ("throughput (tokens/s)", ("tokens_per_s",)),
)
SMOOTH_FROM = 12  # points; shorter series are drawn as recorded only


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows that record ``key`` as a number. A DiPO run's step-0 row
    only evaluates the starting policy: of it, only the ``eval_`` metrics are taken."""
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
              and (r["step"] > 0 or key.startswith("eval_"))]
    return np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)


def varies(values: np.ndarray) -> bool:
    return values.size > 0 and bool(np.nanmax(values) != np.nanmin(values))


def panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """``(title, keys)`` of every panel to draw, key panels first; constant series dropped
    (unless nothing changes yet, as after one step)."""
    numeric = {k for r in rows for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    changing = {k for k in numeric if varies(series(rows, k)[1])} or numeric  # one step: all
    chosen = [(title, [k for k in keys if k in changing]) for title, keys in KEY_PANELS]
    listed = {k for _, keys in KEY_PANELS for k in keys}
    rest = [(k, [k]) for k in sorted(changing - listed)]
    return [(title, keys) for title, keys in chosen + rest if keys]


def log_scale(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> bool:
    """Whether a panel reads better on a log scale: every value positive, spanning over 100x
    (an SFT loss does; a DiPO loss, around 0 and of either sign, never)."""
    values = np.concatenate([series(rows, k)[1] for k in keys])
    return bool(values.size and values.min() > 0 and values.max() > 100 * values.min())


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last ``window`` points (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.arange(1, values.size + 1) - counts]) / counts


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draws ``RUN_DIR/metrics.jsonl`` into ``out`` (default ``RUN_DIR/metrics.png``, written to a
    temporary file, then renamed); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    chosen = panels(rows)
    if not chosen:
        raise ValueError(f"{run_dir}/metrics.jsonl: no metric recorded yet")
    cols = min(3, len(chosen))
    lines = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3 * lines), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, chosen):
        for key in keys:
            steps, values = series(rows, key)
            if values.size >= SMOOTH_FROM:
                raw = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
                ax.plot(steps, moving_average(values, max(2, values.size // 50)),
                        color=raw.get_color(), label=key)
            else:
                ax.plot(steps, values, marker="o", markersize=3, label=key)
        if log_scale(rows, keys):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out + ".tmp.png", out)
    return out
