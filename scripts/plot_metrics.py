#!/usr/bin/env python
"""Plot the curves of a run: ``python scripts/plot_metrics.py RUN_DIR [--out FILE.png]``.

Writes ``RUN_DIR/metrics.png`` (or ``--out``) with :func:`dirl_jax.plots.plot_run`: key panels
first, constant series left out, each series faint with its moving average. Runs draw it
themselves when they end; this redraws it (e.g. while a run is going).
"""

from __future__ import annotations

import argparse
import sys

from dirl_jax.plots import plot_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args()
    try:
        print(plot_run(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
