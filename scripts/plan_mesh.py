"""Default meshes for SDAR blockwise-diffusion SFT: predicted memory per device and step time.

    python scripts/plan_mesh.py [--models SDAR-8B ...] [--model-config DIR_OR_CONFIG_JSON]
        [--hardware v5p-512 8xH100 ...] [--seq-len 8192] [--global-batch 512] [--loss-chunk 2048]
        [--no-remat] [--mfu 0.4] [--memory-fraction 0.8] [--json plans.json]

For every model x slice: the mesh (data x fsdp x tensor) with the smallest tensor axis, then the
smallest fsdp axis whose one-row micro-batch fits ``--memory-fraction`` of HBM, the rest data;
the largest micro-batch per device that fits and the gradient accumulation it implies; the step
time at ``--mfu``. The memory and FLOP model is documented in ``dirl_jax/sizing/plan.py`` and
docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from dirl_jax.sizing import plan as mesh_plan

from dirl_jax.metrics import write_json_atomic
from dirl_jax.model import SDARConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(mesh_plan.SDAR_MODELS),
                        default=list(mesh_plan.SDAR_MODELS))
    parser.add_argument("--model-config", help="also plan a HF model directory or its config.json")
    parser.add_argument("--hardware", nargs="+", metavar="NAME",
                        choices=[hw.name for hw in mesh_plan.HARDWARE],
                        help="slices to plan (default: all of v5e / v5p 8-256 chips, 8xH100, 8xH200)")
    w = mesh_plan.Workload()
    parser.add_argument("--seq-len", type=int, default=w.seq_len,
                        help="sample tokens per row; the SFT canvas holds twice as many")
    parser.add_argument("--global-batch", type=int, default=w.global_batch, help="rows per step")
    parser.add_argument("--block-size", type=int, default=w.block_size)
    parser.add_argument("--loss-chunk", type=int, default=w.loss_chunk)
    parser.add_argument("--no-remat", action="store_true", help="plan without per-layer remat")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    parser.add_argument("--memory-fraction", type=float, default=0.8,
                        help="share of HBM a plan may use (the rest: XLA buffers, fragmentation)")
    parser.add_argument("--json", help="write the plans to this JSON file")
    return parser.parse_args()


def load_models(args: argparse.Namespace) -> dict[str, SDARConfig]:
    models = {name: mesh_plan.SDAR_MODELS[name] for name in args.models}
    if args.model_config:
        path = args.model_config
        directory = os.path.dirname(path) if path.endswith(".json") else path
        models[os.path.basename(os.path.normpath(directory))] = SDARConfig.from_pretrained(directory)
    return models


def main() -> None:
    args = parse_args()
    workload = mesh_plan.Workload(seq_len=args.seq_len, global_batch=args.global_batch,
                                  block_size=args.block_size, loss_chunk=args.loss_chunk,
                                  remat=not args.no_remat)
    hardware = tuple(hw for hw in mesh_plan.HARDWARE if not args.hardware or hw.name in args.hardware)
    models = load_models(args)
    plans = mesh_plan.plan_all(models, hardware, workload, mfu=args.mfu,
                               memory_fraction=args.memory_fraction)
    print(f"SFT, {workload.seq_len}-token samples = {workload.canvas_tokens}-token two-stream canvas "
          f"rows, global batch {workload.global_batch}, remat {workload.remat}, MFU {args.mfu:g}, "
          f"plans use <= {args.memory_fraction:g} of HBM")
    for name, config in models.items():
        print(f"{name}: {mesh_plan.parameter_count(config) / 1e9:.3f} B parameters, "
              f"{mesh_plan.training_flops_per_row(config, workload) / 1e12:.0f} TFLOP per row")
    print(mesh_plan.markdown_table(plans))
    if args.json:
        write_json_atomic(args.json, {
            "workload": {**dataclasses.asdict(workload), "canvas_tokens": workload.canvas_tokens},
            "mfu": args.mfu, "memory_fraction": args.memory_fraction,
            "plans": [plan.to_dict() for plan in plans]})


if __name__ == "__main__":
    main()
