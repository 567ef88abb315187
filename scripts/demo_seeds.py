"""The embedded demo end to end for several seeds: SFT (``configs/sft_tiny.py``) then DiPO from it
(``configs/dipo_tiny.py``), seed after seed, on the built-in task's operand-pair split. Reports
held-out accuracy after SFT and before / after DiPO on the same problems (with 95 % intervals: the
Wilson interval of each accuracy, a paired normal interval of the gain), rollout accuracy and
wall times against the issue's bars; prints a table and writes JSON.

    python scripts/demo_seeds.py --seeds 0 1 2 --json demo_seeds.json

A stage whose run directory already holds its result (``eval.json``) is not run again.
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
BARS = {"sft_accuracy": 0.60, "gain_each": 0.05, "gain_mean": 0.08}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def paired_gain(before: list[int], after: list[int]) -> tuple[float, list[float]]:
    """Mean of the per-problem differences and its 95 % normal interval."""
    d = np.asarray(after, float) - np.asarray(before, float)
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)]


def run_stage(config: str, run_dir: str, seed: int, *extra: str) -> float:
    """Runs one training command unless ``run_dir/eval.json`` exists; its wall time (0 if skipped)."""
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        return 0.0
    start = time.time()
    subprocess.run([sys.executable, "-m", "dirl_jax.train", "--config", config,
                    f"--config.seed={seed}", f"--config.run_dir={run_dir}", *extra], check=True)
    return time.time() - start


def summarize(seed: int, sft_dir: str, dipo_dir: str, sft_s: float, dipo_s: float) -> dict:
    sft, initial, final = (read_json(os.path.join(sft_dir, "eval.json")),
                           read_json(os.path.join(dipo_dir, "eval_initial.json")),
                           read_json(os.path.join(dipo_dir, "eval.json")))
    rows = [json.loads(line) for line in open(os.path.join(dipo_dir, "metrics.jsonl"))]
    steps = [r for r in rows if r["step"] > 0 and "rollout_accuracy" in r]
    tenth = max(len(steps) // 10, 1)
    gain, gain_ci = paired_gain(initial["correct"], final["correct"])
    return {"seed": seed, "num_examples": final["num_examples"],
            "sft_accuracy": sft["accuracy"], "sft_ci95": sft["accuracy_ci95"],
            "dipo_before": initial["accuracy"], "dipo_after": final["accuracy"],
            "dipo_after_ci95": final["accuracy_ci95"], "gain": gain, "gain_ci95": gain_ci,
            "eval_curve": [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r],
            "rollout_accuracy_first": float(np.mean([r["rollout_accuracy"] for r in steps[:tenth]])),
            "rollout_accuracy_last": float(np.mean([r["rollout_accuracy"] for r in steps[-tenth:]])),
            "log_ratio_abs_max": max(r.get("log_ratio_abs_max", 0.0) for r in steps),
            "sft_wall_s": sft_s, "dipo_wall_s": dipo_s,
            **{t: float(np.mean([r.get(t, 0.0) for r in steps])) for t in TIMES}}


def print_table(records: list[dict]) -> None:
    print(f"\n{'seed':>4} | {'SFT held-out (95% CI)':>22} | {'DiPO before -> after':>20} | "
          f"{'gain (95% CI)':>24} | {'rollout acc first/last':>22} | {'SFT / DiPO wall':>16}")
    for r in records:
        print(f"{r['seed']:>4} | {r['sft_accuracy']:.3f} ({r['sft_ci95'][0]:.3f}-{r['sft_ci95'][1]:.3f})"
              f"{'':>3} | {r['dipo_before']:>8.3f} -> {r['dipo_after']:.3f} | "
              f"{r['gain']:+.3f} ({r['gain_ci95'][0]:+.3f}, {r['gain_ci95'][1]:+.3f}) | "
              f"{r['rollout_accuracy_first']:>10.3f} / {r['rollout_accuracy_last']:<9.3f} | "
              f"{r['sft_wall_s'] / 60:>5.1f} / {r['dipo_wall_s'] / 60:.1f} min")
    gains = [r["gain"] for r in records]
    checks = {"SFT >= 0.60 on every seed": all(r["sft_accuracy"] >= BARS["sft_accuracy"] for r in records),
              "gain >= +0.05 on every seed": all(g >= BARS["gain_each"] for g in gains),
              "mean gain >= +0.08": float(np.mean(gains)) >= BARS["gain_mean"]}
    print(f"mean gain {np.mean(gains):+.3f}; " + "; ".join(
        f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    print("mean DiPO step time: " + ", ".join(
        f"{t} {np.mean([r[t] for r in records]):.2f}" for t in TIMES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sft-override", action="append", default=[],
                        help="an extra --config.x=y flag for SFT (repeatable)")
    parser.add_argument("--dipo-override", action="append", default=[],
                        help="an extra --config.x=y flag for DiPO (repeatable)")
    args = parser.parse_args()
    records = []
    for seed in args.seeds:
        sft_dir, dipo_dir = (os.path.join(args.out, f"sft_seed{seed}"),
                             os.path.join(args.out, f"dipo_seed{seed}"))
        sft_s = run_stage("configs/sft_tiny.py", sft_dir, seed, *args.sft_override)
        dipo_s = run_stage("configs/dipo_tiny.py", dipo_dir, seed, f"--config.init_from={sft_dir}",
                           *args.dipo_override)
        records.append({**summarize(seed, sft_dir, dipo_dir, sft_s, dipo_s), **machine()})
        print_table(records)
    write_records(args.json, records)


if __name__ == "__main__":
    main()
