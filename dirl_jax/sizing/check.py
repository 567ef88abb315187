"""The compile check of a run config on a TPU slice: the architecture, the run's mesh over the
slice's devices, every program compiled (:mod:`.programs`, :mod:`.report`), the report written,
the micro-batch search and the planner comparison."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from ml_collections import ConfigDict

from dirl_jax import mesh as mesh_lib
from dirl_jax import run
from dirl_jax.config import check_model_block_size
from dirl_jax.metrics import write_json_atomic
from dirl_jax.model import SDARConfig
from dirl_jax.sizing import plan as plan_lib
from dirl_jax.sizing.chips import GIB, Slice, parse_slice
from dirl_jax.sizing.programs import Program, run_programs
from dirl_jax.sizing.report import Record, compile_program, problems, table

REPORT = "compile_report.json"
SEARCH_HEADROOM = 0.10


class SizingError(ValueError):
    """A compile-check input the user must fix (its message names the flag or field)."""


def topology_devices(slice_: Slice) -> list[Any]:
    """The devices of a TPU slice that need not exist (the TPU compiler's topology)."""
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=slice_.topology).devices)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise SizingError(f"--topology {slice_.name}: no TPU compiler for {slice_.topology} ({first}); "
                          "run in .venv-tpu (bash scripts/setup_tpu_compile.sh)") from None


def architecture(config: ConfigDict, model: str | None, model_config_path: str | None) -> SDARConfig:
    """``--model-config``, else the ``--model`` preset, else ``init_from``'s config.json when it
    is a local directory, else (no ``init_from``) the config's own ``model`` section."""
    if model_config_path:
        directory = os.path.dirname(model_config_path) if model_config_path.endswith(".json") \
            else model_config_path
        return SDARConfig.from_pretrained(directory or ".")
    if model:
        if model not in plan_lib.SDAR_MODELS:
            raise SizingError(f"--model {model}: unknown; presets: {', '.join(plan_lib.SDAR_MODELS)}")
        return plan_lib.SDAR_MODELS[model]
    if config.init_from:
        if not os.path.isdir(config.init_from):
            raise SizingError(
                f"init_from {config.init_from!r} is not a local directory, so its config.json cannot "
                f"be read: give --model ({', '.join(plan_lib.SDAR_MODELS)}) or --model-config PATH")
        return SDARConfig.from_pretrained(run.init_model_dir(config))
    return run.build_model_config(config, run.build_tokenizer(config))


def run_mesh(config: ConfigDict, model_config: SDARConfig, devices: list[Any]) -> Any:
    """The run's mesh over ``devices``, every axis checked against the model and the batch first."""
    shape = mesh_lib.mesh_shape(config.mesh, len(devices))
    if config.task == "dipo":
        mesh_lib.check_mesh_fits(shape, model_config, config.train.canvas_rows,
                                 rows_field="train.canvas_rows")
    else:
        mesh_lib.check_mesh_fits(shape, model_config, config.train.global_batch // config.train.grad_accum)
    return mesh_lib.make_mesh(shape, devices)


def validated(config: ConfigDict, model_config: SDARConfig) -> None:
    if config.task == "dipo":
        run.validate_dipo(config)
    else:
        run.validate_sft(config)
        check_model_block_size(config, model_config.block_size)


def compile_all(config: ConfigDict, model_config: SDARConfig, slice_: Slice, devices: list[Any],
                names: list[str] | None = None, slots: int | None = None) -> list[Record]:
    """Every (or every named) program of the run, compiled for the slice."""
    mesh = run_mesh(config, model_config, devices)
    programs = run_programs(config, model_config, mesh, slots)
    if names:
        unknown = set(names) - {p.name for p in programs}
        if unknown:
            raise SizingError(f"--programs: {', '.join(sorted(unknown))} not among this run's "
                              f"programs ({', '.join(p.name for p in programs)})")
        programs = [p for p in programs if p.name in names]
    records = []
    for program in programs:
        record = compile_program(program, slice_.topology, slice_.chip)
        print(f"compiled {record.program} in {record.compile_seconds:.0f} s: "
              f"{record.peak_bytes / GIB:.2f} GiB per chip"
              + (f" (error: {record.error})" if record.error else ""), flush=True)
        records.append(record)
    return records


# ----------------------------------------------------------------------------- search
def _largest(fits: Callable[[int], bool], candidates: list[int]) -> int | None:
    """The largest candidate (ascending list) that fits: doubling through the list, then
    bisecting between the last that fit and the first that did not."""
    good, index = None, 0
    while index < len(candidates) and fits(candidates[index]):
        good, index = index, 2 * index + 1
    low, high = (-1 if good is None else good), min(index, len(candidates))
    while high - low > 1:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            low = middle
        else:
            high = middle
    return candidates[low] if low >= 0 else None


def _fits_with_headroom(records: list[Record]) -> bool:
    return all(not r.error and r.headroom >= SEARCH_HEADROOM for r in records)


def search_micro_batch(config: ConfigDict, model_config: SDARConfig, slice_: Slice,
                     devices: list[Any]) -> dict[str, Any]:
    """The largest per-chip micro-batch (SFT rows, DiPO canvas rows) and engine slots that fit
    with ``SEARCH_HEADROOM``; returns the overrides (``--config.a.b=v``) and what was found."""
    shape = mesh_lib.mesh_shape(config.mesh, len(devices))
    row_shards = shape[0] * shape[1]
    found: dict[str, Any] = {"overrides": []}
    if config.task == "dipo":
        update = ["dipo_gradients", "dipo_score", "dipo_apply"]
        candidates = [m * row_shards for m in range(1, 257)]

        def fits_rows(rows: int) -> bool:
            trial = config.copy_and_resolve_references()
            trial.train.canvas_rows = rows
            return _fits_with_headroom(compile_all(trial, model_config, slice_, devices, update))
        rows = _largest(fits_rows, candidates)
        found["canvas_rows"] = rows
        if rows:
            found["overrides"].append(f"--config.train.canvas_rows={rows}")
        engine = ["rollout_prefill", "rollout_chunk"]
        slot_candidates = [2 ** k for k in range(0, 15)]
        slots = _largest(lambda s: _fits_with_headroom(
            compile_all(config, model_config, slice_, devices, engine, slots=s)), slot_candidates)
        found["slots"] = slots
        if slots:
            found["overrides"].append(f"--config.rollout.slots={slots}")
        return found
    t = config.train
    per_chip = [m for m in range(1, t.global_batch // row_shards + 1)
                if t.global_batch % (m * row_shards) == 0]

    def fits_micro(m: int) -> bool:
        trial = config.copy_and_resolve_references()
        trial.train.grad_accum = t.global_batch // (m * row_shards)
        return _fits_with_headroom(compile_all(trial, model_config, slice_, devices))
    micro = _largest(fits_micro, per_chip)
    found["micro_rows_per_chip"] = micro
    if micro:
        found["grad_accum"] = t.global_batch // (micro * row_shards)
        found["overrides"].append(f"--config.train.grad_accum={found['grad_accum']}")
    return found


# ----------------------------------------------------------------------------- planner
def planned_bytes(config: ConfigDict, model_config: SDARConfig, record: Record) -> float | None:
    """The arithmetic planner's peak bytes per chip for a compiled program (None: not planned)."""
    mesh = plan_lib.MeshShape(**record.mesh)
    if record.program == "sft_train_step":
        t = config.train
        workload = plan_lib.Workload(seq_len=config.data.max_length, global_batch=t.global_batch,
                                     block_size=config.diffusion.block_size,
                                     loss_chunk=config.diffusion.loss_chunk, remat=config.model.remat)
        rows = t.global_batch // t.grad_accum // (mesh.data * mesh.fsdp)
        return plan_lib.memory_per_device(model_config, workload, mesh, rows).total
    return None


# ----------------------------------------------------------------------------- the command
def run_check(config: ConfigDict, *, topology: str, model: str | None = None,
              model_config_path: str | None = None, out: str | None = None,
              programs: list[str] | None = None, find_micro_batch: bool = False,
              compare_plan: bool = False) -> str | None:
    """Compiles the run's programs for ``topology``, prints the table, writes the report; returns
    the one-line problem when a program does not compile or fit (None when all fit)."""
    try:
        slice_ = parse_slice(topology)
    except ValueError as e:
        raise SizingError(str(e)) from None
    model_config = architecture(config, model, model_config_path)
    validated(config, model_config)
    devices = topology_devices(slice_)
    print(f"compile check: {config.task} on {slice_.name} ({slice_.topology}, {len(devices)} chips "
          f"of {slice_.chip.hbm_bytes / GIB:.0f} GiB), mesh data x fsdp x tensor = "
          f"{'x'.join(map(str, mesh_lib.mesh_shape(config.mesh, len(devices))))}", flush=True)
    records = compile_all(config, model_config, slice_, devices, programs)
    report: dict[str, Any] = {
        "task": config.task, "topology": slice_.topology, "slice": slice_.name,
        "chip": dataclasses.asdict(slice_.chip), "model": dataclasses.asdict(model_config),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "records": [r.to_dict() for r in records]}
    print(table(records))
    if compare_plan:
        rows = []
        for r in records:
            planned = planned_bytes(config, model_config, r)
            rows.append({"program": r.program, "planned_bytes": planned, "compiled_bytes": r.peak_bytes,
                         "difference": None if planned is None or not r.peak_bytes
                         else planned / r.peak_bytes - 1})
        report["plan_comparison"] = rows
        print("| program | planned GiB | compiled GiB | planned / compiled − 1 |\n|---|---|---|---|")
        for row in rows:
            planned = "not planned" if row["planned_bytes"] is None else f"{row['planned_bytes'] / GIB:.2f}"
            diff = "" if row["difference"] is None else f"{100 * row['difference']:+.0f} %"
            print(f"| {row['program']} | {planned} | {row['compiled_bytes'] / GIB:.2f} | {diff} |")
    if find_micro_batch:
        report["search"] = search = search_micro_batch(config, model_config, slice_, devices)
        print("largest that fits with 10 % headroom: "
              + (" ".join(search["overrides"]) or "nothing fits"))
    if out:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, REPORT), report)
        print(f"report: {os.path.join(out, REPORT)}")
    found = problems(records)
    if found:
        more = f" (and {len(found) - 1} more in the report)" if len(found) > 1 else ""
        return found[0] + more
    return None

__all__ = ["Program", "SizingError", "run_check"]
