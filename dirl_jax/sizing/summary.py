"""``python -m dirl_jax.sizing.summary REPORT.json ...``: one Markdown table over compile reports
(the results table of docs/SCALING.md): per program, fits / headroom / peak / planned bytes /
compiled TFLOP / predicted seconds, or why it did not compile."""

from __future__ import annotations

import json
import sys

from dirl_jax.sizing.chips import GIB


def rows(report: dict) -> list[str]:
    model = report["model"]
    name = f"{model['hidden_size']}x{model['num_hidden_layers']}"
    planned = {p["program"]: p["planned_bytes"] for p in report.get("plan_comparison", [])}
    out = []
    for r in report["records"]:
        mesh = "x".join(str(v) for v in r["mesh"].values())
        plan = planned.get(r["program"])
        plan_text = "—" if plan is None else f"{plan / GIB:.1f}"
        if r["error"]:
            needed = f"needs {r['peak_bytes'] / GIB:.1f}" if r["peak_bytes"] else ""
            why = "compiler abort (XLA check failure)" if "process ended" in r["error"] else \
                "out of HBM" if "out of HBM" in r["error"] else r["error"][:60]
            out.append(f"| {report['slice']} | {name} | {r['program']} | {mesh} | {r['attention_impl']} | "
                       f"✗ {why} {needed} | | {plan_text} | | |")
            continue
        out.append(f"| {report['slice']} | {name} | {r['program']} | {mesh} | {r['attention_impl']} "
                   f"({r['mosaic_calls']}) | {r['peak_bytes'] / GIB:.1f} / {r['hbm_bytes'] / GIB:.0f} "
                   f"| {100 * r['headroom']:.0f} % | {plan_text} | {r['flops'] / 1e12:.1f} | "
                   f"{r['predicted_seconds']:.3g} |")
    return out


def main(paths: list[str]) -> None:
    print("| slice | model (E x L) | program | mesh | attention (Mosaic calls) | peak GiB / HBM | "
          "headroom | planned GiB | TFLOP | predicted s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            print("\n".join(rows(json.load(f))))


if __name__ == "__main__":
    main(sys.argv[1:])
