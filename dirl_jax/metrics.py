"""Training metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard scalars, and a
console line with step, loss, learning rate, grad norm, tokens/s and ETA.

Both files are written synchronously and flushed every call, so a full disk or an I/O error
stops the run at the step that hit it with a :class:`MetricsWriteError` naming the file (an
asynchronous TensorBoard writer thread would die silently and block the next write forever)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

log = logging.getLogger(__name__)


# Printed on the console line when a row has them (SFT: masked fraction; DiPO: accuracies).
_OPTIONAL_FIELDS = (("masked_fraction", "masked"), ("rollout_accuracy", "rollout acc"),
                    ("eval_accuracy", "eval acc"), ("log_ratio_abs_max", "|log ratio|"))


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsWriteError(OSError):
    """Writing metrics failed (full disk, I/O error): the message names the file."""


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise MetricsWriteError(e.errno, f"cannot write {path}: {e.strerror or e}; the run stops "
                                         "here (its last checkpoint resumes it)") from e


def kept_rows(path: str, resume_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``resume_step``. A torn last line (a write cut off)
    is dropped with a warning naming the file; a malformed line before it is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if number == len(lines):
                log.warning("%s: line %d is incomplete (%s); dropped", path, number, e)
                break
            raise ValueError(f"{path}: line {number} is not a metrics row ({e}); expected one JSON "
                             "object with a 'step' per line") from e
        if step <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsWriter:
    """Appends step metrics; on resume, drops rows after the restored step first."""

    def __init__(self, run_dir: str, *, resume_step: int = 0, total_steps: int, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.enabled = enabled
        self._timed_from: tuple[float, int] | None = None  # (time, step) of the first row written
        if not enabled:
            return
        if os.path.exists(self.path):
            kept = kept_rows(self.path, resume_step)
            with _writing(self.path + ".tmp"):
                with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        tensorboard_dir = os.path.join(run_dir, "tensorboard")
        with _writing(tensorboard_dir):
            os.makedirs(tensorboard_dir, exist_ok=True)
            self._events = EventsWriter(os.path.join(tensorboard_dir, "events"))
        self._events_path = tensorboard_dir

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Writes per-step rows (each with a ``step``), flushed, and prints the last one."""
        if not self.enabled or not rows:
            return
        with _writing(self.path):
            self._file.write("".join(json.dumps(row) + "\n" for row in rows))
            self._file.flush()
        with _writing(self._events_path):
            for row in rows:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._events.write_event(Event(wall_time=time.time(), step=row["step"],
                                                       summary=scalar(key, value)))
            self._events.flush()
        last = rows[-1]
        print(f"step {last['step']}/{self.total_steps} | loss {last['loss']:.4f} | "
              f"lr {last['lr']:.2e} | grad_norm {last['grad_norm']:.3f} | "
              + "".join(f"{label} {last[key]:.3f} | " for key, label in _OPTIONAL_FIELDS if key in last)
              + f"{last['tokens_per_s']:,.0f} tok/s | eta {self.eta(last['step'])}", flush=True)

    def eta(self, step: int, now: float | None = None) -> str:
        """Time left after ``step``, from the steps since the first written row: compiling (in
        the first rows of a run or a resume) is never extrapolated; ``measuring`` until then."""
        now = time.time() if now is None else now
        if step <= 0:  # DiPO's step 0 only evaluates the starting policy: no step was timed
            return "measuring"
        if self._timed_from is None:
            self._timed_from = (now, step)
            return "measuring"
        start_time, start_step = self._timed_from
        if step <= start_step:
            return "measuring"
        return format_duration((now - start_time) / (step - start_step) * (self.total_steps - step))

    def close(self) -> None:
        if self.enabled:
            with _writing(self.path):
                self._file.close()
            with _writing(self._events_path):
                self._events.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (FileNotFoundError naming it when absent)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a run directory?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
