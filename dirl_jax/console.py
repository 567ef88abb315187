"""What a run says on the console when it starts (where it writes, the model, the devices and mesh,
the steps ahead, that it is compiling) and when it ends (what it measured and where every output
went). Only process 0 prints."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

from dirl_jax.model import SDARConfig


def say(lines: Sequence[str]) -> None:
    """Prints ``lines`` on process 0."""
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def parameter_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def format_count(count: int) -> str:
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def start_banner(task: str, run_dir: str, model_config: SDARConfig, params: Any,
                 mesh: jax.sharding.Mesh, *, start: int, total: int, detail: str) -> None:
    """The lines a run prints before its first compiled step."""
    devices = jax.devices()
    shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    dtype = str(jax.tree.leaves(params)[0].dtype)
    progress = f"resuming at step {start + 1} of {total}" if start else f"{total} steps"
    say([f"{task}: {shown_path(run_dir)} ({progress}; {detail})",
          f"  model: {format_count(parameter_count(params))} parameters, "
          f"{model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, "
          f"block size {model_config.block_size}, {dtype} weights",
          f"  devices: {jax.process_count()} process(es), {len(devices)} {devices[0].platform} "
          f"device(s); mesh {shape}",
          "  compiling the first step (a minute or more on CPU; the ETA counts from the second)"])


def closing_lines(summary: str, outputs: Sequence[tuple[str, str, str]]) -> None:
    """``summary``, then one line per output: ``label  path  (what to do with it)``; outputs
    whose path does not exist are left out."""
    present = [(label, path, hint) for label, path, hint in outputs if os.path.exists(path)]
    width = max((len(label) for label, _, _ in present), default=0)
    say([summary] + [f"  {label:<{width}}  {shown_path(path)}" + (f"  ({hint})" if hint else "")
                      for label, path, hint in present])


def run_outputs(run_dir: str) -> list[tuple[str, str, str]]:
    """The files a training run leaves, with what to do next."""
    join = lambda *parts: os.path.join(run_dir, *parts)  # noqa: E731
    shown = shown_path(run_dir)
    return [
        ("export", join("export"), f"python -m dirl_jax.generate --model {shown} --prompt ..."),
        ("held-out eval", join("eval.json"), "accuracy, examples, per-example answers"),
        ("evaluated set", join("heldout.jsonl"), "the held-out problems scored, never trained on"),
        ("curves", join("metrics.png"), f"redraw: python scripts/plot_metrics.py {shown}"),
        ("metrics", join("metrics.jsonl"), f"tensorboard --logdir {shown}"),
        ("checkpoints", join("checkpoints"), "a larger train.num_steps resumes from the latest"),
    ]
