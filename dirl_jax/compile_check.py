"""``python -m dirl_jax.compile_check --config configs/<name>.py --topology v5p-64 --out DIR``:
every program of the run compiled for a TPU slice by the real XLA:TPU and Mosaic compilers, from
a CPU host (needs ``jax[tpu]``: ``bash scripts/setup_tpu_compile.sh`` makes ``.venv-tpu``).

No weights and no data: shapes come from the config, the architecture from ``init_from``'s
config.json when it is a local directory, else from ``--model NAME`` (SDAR-1.7B, SDAR-4B,
SDAR-8B) or ``--model-config PATH``. Writes ``DIR/compile_report.json`` (one record per program:
memory per chip, fits / headroom, compiled FLOPs and bytes, predicted seconds, attention kernel
and its Mosaic calls) and prints a table; exits 2 naming the program, its bytes and the config
fields to change when a program does not compile or does not fit. ``--find-micro-batch``
searches the largest per-chip micro-batch (and engine slots) that fits with 10 % headroom;
``--compare-plan`` sets the arithmetic planner's bytes beside the compiler's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ml_collections import ConfigDict

from dirl_jax.cli import fail, run_config_command
from dirl_jax.config import sft_defaults

def _quiet_libtpu() -> None:
    """A CPU host has no TPU metadata server and no chip to lock: libtpu is told so instead of
    logging about it, and several compile checks may run at once."""
    from dirl_jax.distributed import tpu_chips_present
    if not tpu_chips_present():
        for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                            ("TPU_WORKER_HOSTNAMES", "localhost"), ("JAX_PLATFORMS", "cpu"),
                            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(name, value)


def define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("topology", None, "TPU slice (v5p-64, v5litepod-256, v6e-64) or topology "
                        "(v5p:2x4x4)")
    flags.DEFINE_string("model", None, "architecture preset when init_from has no local config.json")
    flags.DEFINE_string("model_config", None, "a HF model directory or its config.json")
    flags.DEFINE_string("out", None, "directory for compile_report.json (default: no file)")
    flags.DEFINE_list("programs", None, "compile only these programs (default: all of the run's)")
    flags.DEFINE_bool("find_micro_batch", False, "search the largest micro-batch / slots per chip "
                      "that fit with 10 % headroom")
    flags.DEFINE_bool("compare_plan", False, "print the arithmetic planner's bytes beside the compiler's")
    flags.DEFINE_string("record_to", None, "internal: compile in this process and write the records "
                        "to this file (each program runs in such a child)")


def child_command_line(argv: list[str]) -> list[str]:
    """What a child compiling one program repeats of ``argv``: the config, its overrides, the
    topology and the architecture (not the outputs, the program list or the searches)."""
    keep, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--out", "--programs", "--record_to"):
            skip = "=" not in arg
            continue
        if name.lstrip("-").removeprefix("no") in ("find_micro_batch", "compare_plan"):
            continue
        keep.append(arg)
    return keep


def config_fields(argv: list[str]) -> list[str]:
    """The config fields ``argv`` overrides (``--config.train.grad_accum=4`` -> ``train.grad_accum``)."""
    return [arg.split("=", 1)[0].removeprefix("--config.") for arg in argv
            if arg.startswith("--config.")]


def main(config: ConfigDict, argv: list[str]) -> None:
    from absl import flags

    from dirl_jax.sizing import check
    f = flags.FLAGS
    if not f.topology:
        fail("--topology is required: a TPU slice such as v5p-64 or a topology such as v5p:2x4x4")
    result = check.run_check(config, topology=f.topology, model=f.model,
                             model_config_path=f.model_config, out=f.out, programs=f.programs,
                             find_micro_batch=f.find_micro_batch, compare_plan=f.compare_plan,
                             isolate=None if f.record_to else child_command_line(argv),
                             record_to=f.record_to, explicit=config_fields(argv))
    if result:
        fail(result)


OWN_FLAGS = ("topology", "model", "model_config", "out", "programs", "find_micro_batch",
             "compare_plan", "record_to")


def dashed_flags(argv: list[str]) -> list[str]:
    """``--model-config`` / ``--find-micro-batch`` ... accepted for this command's own flags."""
    def one(arg: str) -> str:
        name, sep, value = arg.partition("=")
        plain = name.lstrip("-").replace("-", "_")
        if plain.startswith("no_") and plain[3:] in OWN_FLAGS:
            plain = "no" + plain[3:]  # absl's negation of a boolean flag
        return f"--{plain}{sep}{value}" if name.startswith("--") and plain.removeprefix("no") in OWN_FLAGS \
            or name.startswith("--") and plain in OWN_FLAGS else arg
    return [one(a) for a in argv]


def entry(argv: list[str]) -> Any:
    _quiet_libtpu()
    define_flags()
    argv = dashed_flags(argv)
    from dirl_jax.sizing.check import SizingError
    run_config_command(lambda config: main(config, argv), __doc__, sft_defaults, argv,
                       errors=(SizingError,), join_run=False)


if __name__ == "__main__":
    entry(sys.argv)
