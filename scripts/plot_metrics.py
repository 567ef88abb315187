#!/usr/bin/env python
"""Plot the curves of a run: ``python scripts/plot_metrics.py RUN_DIR [--out FILE.png]``.

Reads ``RUN_DIR/metrics.jsonl`` and writes one PNG with a panel per numeric metric
(default ``RUN_DIR/metrics.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args()
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"{path}: not found (is {args.run_dir} a run directory?)", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        print(f"{path}: no metrics yet", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(5 * cols, 3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    fig.savefig(out + ".tmp.png", dpi=100)
    os.replace(out + ".tmp.png", out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
