"""XLA:CPU settings the package applies before JAX starts its CPU backend.

XLA:CPU hands reductions and elementwise loops next to a matmul to YNNPACK fusions by default;
on the SFT step those fuse the vocabulary projection with the softmax's ``reduce_max`` into a
kernel about 4x slower than the plain matmul (``scripts/profile_train_step.py``; the ~100M step
takes 11 % less time without them, docs/PERFORMANCE.md). Dot fusions stay. The flag only
concerns the CPU backend; a value the user already put in ``XLA_FLAGS`` wins, and nothing
changes once JAX has initialised its backends.

(Crashes of long test processes that were once blamed on this flag came from Linux's limit on a
process's memory mappings: see ``release_compiled_programs`` in ``tests/conftest.py``.)
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "-reduce,-eltwise"


def apply_defaults() -> None:
    """Adds ``YNN_FLAG=YNN_VALUE`` to ``XLA_FLAGS`` unless the user set the flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}={YNN_VALUE}".strip()
