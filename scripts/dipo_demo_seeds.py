"""Runs the DiPO toy demo (``configs/dipo_tiny.py``) for several seeds, one after another, and
reports held-out greedy accuracy before / after, rollout accuracy, wall time and the per-step
time breakdown; prints a table and writes JSON.

    python scripts/dipo_demo_seeds.py --init-from runs/sft_tiny --seeds 0 1 2 --json dipo_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchlib import machine, write_records

TIMES = ("rollout_s", "reward_s", "train_s", "weight_sync_s")


def summarize(run_dir: str, seed: int, wall_s: float) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    steps = [r for r in rows if r["step"] > 0 and "rollout_accuracy" in r]
    ten = max(len(steps) // 10, 1)
    return {"seed": seed, "wall_s": wall_s, "eval_curve": evals,
            "eval_before": evals[0][1], "eval_after": evals[-1][1],
            "rollout_accuracy_first": float(np.mean([r["rollout_accuracy"] for r in steps[:ten]])),
            "rollout_accuracy_last": float(np.mean([r["rollout_accuracy"] for r in steps[-ten:]])),
            "log_ratio_abs_max": max(r.get("log_ratio_abs_max", 0.0) for r in steps),
            **{t: float(np.mean([r.get(t, 0.0) for r in steps])) for t in TIMES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", default="runs/sft_tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/dipo_demo")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra --config.x=y flags")
    args = parser.parse_args()
    records = []
    for seed in args.seeds:
        run_dir = os.path.join(args.out, f"seed{seed}")
        start = time.time()
        subprocess.run([sys.executable, "-m", "dirl_jax.train", "--config", "configs/dipo_tiny.py",
                        f"--config.seed={seed}", f"--config.run_dir={run_dir}",
                        f"--config.init_from={args.init_from}", *args.overrides], check=True)
        records.append({**summarize(run_dir, seed, time.time() - start), **machine()})
    print(f"\n{'seed':>4} | {'held-out before':>15} | {'after':>5} | {'rollout acc first/last 10%':>26} "
          f"| {'max |log ratio|':>15} | {'wall':>7}")
    for r in records:
        print(f"{r['seed']:>4} | {r['eval_before']:>15.3f} | {r['eval_after']:>5.3f} | "
              f"{r['rollout_accuracy_first']:>12.3f} / {r['rollout_accuracy_last']:<11.3f} | "
              f"{r['log_ratio_abs_max']:>15.1e} | {r['wall_s'] / 60:>5.1f}min")
    print("mean step time: " + ", ".join(f"{t} {np.mean([r[t] for r in records]):.2f}" for t in TIMES))
    write_records(args.json, records)


if __name__ == "__main__":
    main()
