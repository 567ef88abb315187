"""Training metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard scalars, and a
console line with step, loss, learning rate, grad norm, tokens/s and ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from tensorboardX import SummaryWriter


# Printed on the console line when a row has them (SFT: masked fraction; DiPO: accuracies).
_OPTIONAL_FIELDS = (("masked_fraction", "masked"), ("rollout_accuracy", "rollout acc"),
                    ("eval_accuracy", "eval acc"), ("log_ratio_abs_max", "|log ratio|"))


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsWriter:
    """Appends step metrics; on resume, drops rows after the restored step first."""

    def __init__(self, run_dir: str, *, resume_step: int = 0, total_steps: int, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.enabled = enabled
        self._start_time = time.time()
        self._start_step = resume_step
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Writes per-step rows (each with a ``step``) and prints the last one."""
        if not self.enabled or not rows:
            return
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, row["step"])
        self._file.flush()
        last = rows[-1]
        done = last["step"] - self._start_step
        elapsed = time.time() - self._start_time
        eta = elapsed / max(done, 1) * (self.total_steps - last["step"])
        extras = "".join(f"{label} {last[key]:.3f} | " for key, label in _OPTIONAL_FIELDS if key in last)
        print(f"step {last['step']}/{self.total_steps} | loss {last['loss']:.4f} | "
              f"lr {last['lr']:.2e} | grad_norm {last['grad_norm']:.3f} | {extras}"
              f"{last['tokens_per_s']:,.0f} tok/s | eta {_format_duration(eta)}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tensorboard.close()


def start_run_dir(run_dir: str, config: dict[str, Any]) -> str:
    """Creates ``run_dir`` (absolute path returned) and writes ``config.json``; in a multi-host
    run only process 0 writes files there."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
    return run_dir


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file (no half-written files)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
