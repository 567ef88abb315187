"""The compile check of a run config on a TPU slice: the architecture, the run's mesh over the
slice's devices, every program compiled (:mod:`.programs`, :mod:`.report`), the report written,
the micro-batch search and the planner comparison."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from ml_collections import ConfigDict

from dirl_jax import mesh as mesh_lib
from dirl_jax import run
from dirl_jax.config import check_model_block_size
from dirl_jax.metrics import write_json_atomic
from dirl_jax.model import SDARConfig
from dirl_jax.sizing import plan as plan_lib
from dirl_jax.sizing.chips import GIB, Slice, parse_slice
from dirl_jax.sizing.programs import Program, run_programs
from dirl_jax.sizing.report import Record, compile_program, failed_record, problems, table

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


def with_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """A copy of ``config`` with ``--config.a.b=value`` overrides applied (each value parsed as
    the field's current type)."""
    config = config.copy_and_resolve_references()
    for override in overrides:
        path, _, value = override.removeprefix("--config.").partition("=")
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = type(node[leaf])(value)
    return config


def fitted_to_slice(config: ConfigDict, shape: tuple[int, int, int],
                    explicit: Sequence[str] = ()) -> list[str]:
    """The overrides (``--config.a.b=v``) that fit the config's micro-batch to a slice whose
    ``data x fsdp`` does not divide it: DiPO's ``train.canvas_rows`` and SFT's ``train.grad_accum``
    to the smallest micro-batch at least the config's that the mesh divides (the global batch
    kept). A recipe written for one 8-GPU node compiles on a pod as it would be run there; fields
    in ``explicit`` (given on the command line) are the user's and left to the mesh check."""
    shards = shape[0] * shape[1]
    t = config.train
    if config.task == "dipo":
        if t.canvas_rows % shards == 0 or "train.canvas_rows" in explicit:
            return []
        return [f"--config.train.canvas_rows={-(-t.canvas_rows // shards) * shards}"]
    micro = t.global_batch // t.grad_accum
    if micro % shards == 0 or "train.grad_accum" in explicit:
        return []
    for rows in range(-(-micro // shards) * shards, t.global_batch + 1, shards):
        if t.global_batch % rows == 0:
            return [f"--config.train.grad_accum={t.global_batch // rows}"]
    return []


def compile_in_child(argv: Sequence[str], overrides: Sequence[str], program: Program,
                     slice_: Slice) -> Record:
    """``program`` compiled by a child ``compile_check`` (the same command line, that program
    only): a compiler that aborts the process (XLA check failures are fatal) is one failed
    record, not the end of the check."""
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        result = subprocess.run([sys.executable, "-m", "dirl_jax.compile_check", *argv, *overrides,
                                 "--programs", program.name, "--record_to", path],
                                capture_output=True, text=True)
        if result.returncode == 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return Record(**json.load(f)[0])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    fatal = [line.split("] ", 1)[-1] for line in lines if "Check failed" in line or line.startswith("F")]
    why = fatal[0] if fatal else (lines[-1] if lines else f"exit status {result.returncode}")
    status = (f"killed by signal {-result.returncode}" if result.returncode < 0
              else f"exit status {result.returncode}")
    return failed_record(program, slice_.topology, slice_.chip,
                         f"the compiler process ended ({status}): {why.strip()}", time.time() - start,
                         attention_impl="unknown (the child ended)")


def compile_all(config: ConfigDict, model_config: SDARConfig, slice_: Slice, devices: list[Any],
                names: list[str] | None = None, slots: int | None = None,
                overrides: Sequence[str] = (), isolate: Sequence[str] | None = None) -> list[Record]:
    """Every (or every named) program of the run with ``overrides``, compiled for the slice:
    in this process, or each in a child process running the command line ``isolate``."""
    config = with_overrides(config, overrides)
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
        if isolate is None:
            record = compile_program(program, slice_.topology, slice_.chip)
        else:
            extra = [*overrides, *([f"--config.rollout.slots={slots}"] if slots else [])]
            record = compile_in_child(isolate, extra, program, slice_)
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
                       devices: list[Any], isolate: Sequence[str] | None = None) -> dict[str, Any]:
    """The largest per-chip micro-batch (SFT rows, DiPO canvas rows) and engine slots that fit
    with ``SEARCH_HEADROOM``; returns the overrides (``--config.a.b=v``) and what was found."""
    shape = mesh_lib.mesh_shape(config.mesh, len(devices))
    row_shards = shape[0] * shape[1]
    found: dict[str, Any] = {"overrides": []}

    def fits(names: list[str] | None, overrides: list[str], slots: int | None = None) -> bool:
        return _fits_with_headroom(compile_all(config, model_config, slice_, devices, names, slots,
                                               overrides, isolate))
    if config.task == "dipo":
        rows = _largest(lambda n: fits(["dipo_gradients", "dipo_score", "dipo_apply"],
                                       [f"--config.train.canvas_rows={n}"]),
                        [m * row_shards for m in range(1, 257)])
        slots = _largest(lambda n: fits(["rollout_prefill", "rollout_chunk"], [], n),
                         [2 ** k for k in range(15)])
        found.update(canvas_rows=rows, slots=slots)
        found["overrides"] += ([f"--config.train.canvas_rows={rows}"] if rows else []) + (
            [f"--config.rollout.slots={slots}"] if slots else [])
        return found
    batch = config.train.global_batch
    micro = _largest(lambda m: fits(None, [f"--config.train.grad_accum={batch // (m * row_shards)}"]),
                     [m for m in range(1, batch // row_shards + 1) if batch % (m * row_shards) == 0])
    found["micro_rows_per_chip"] = micro
    if micro:
        found["grad_accum"] = batch // (micro * row_shards)
        found["overrides"].append(f"--config.train.grad_accum={found['grad_accum']}")
    return found


# ----------------------------------------------------------------------------- planner
def planned_bytes(config: ConfigDict, model_config: SDARConfig, record: Record) -> float | None:
    """The arithmetic planner's peak bytes per chip for a compiled program (None: not planned)."""
    mesh = plan_lib.MeshShape(*(record.mesh.get(a, 1) for a in mesh_lib.AXES))
    if record.engine:
        return plan_lib.rollout_bytes(record.program, model_config, config, mesh,
                                      record.engine["slots"], record.engine["capacity"])
    if record.program == "sft_train_step":
        t = config.train
        workload = plan_lib.Workload(seq_len=config.data.max_length, global_batch=t.global_batch,
                                     block_size=config.diffusion.block_size,
                                     loss_chunk=config.diffusion.loss_chunk, remat=config.model.remat)
        rows = t.global_batch // t.grad_accum // (mesh.data * mesh.fsdp)
        return plan_lib.memory_per_device(model_config, workload, mesh, rows).total
    return plan_lib.dipo_program_bytes(record.program, model_config, config, mesh)


# ----------------------------------------------------------------------------- the command
def run_check(config: ConfigDict, *, topology: str, model: str | None = None,
              model_config_path: str | None = None, out: str | None = None,
              programs: list[str] | None = None, find_micro_batch: bool = False,
              compare_plan: bool = False, isolate: Sequence[str] | None = None,
              record_to: str | None = None, explicit: Sequence[str] = ()) -> str | None:
    """Compiles the run's programs for ``topology``, prints the table, writes the report; returns
    the one-line problem when a program does not compile or fit (None when all fit).

    ``isolate``: the command line that compiles one program in a child process (see
    :func:`compile_in_child`); ``record_to``: be that child, writing the records to this file;
    ``explicit``: the config fields the command line set (never refitted, :func:`fitted_to_slice`)."""
    try:
        slice_ = parse_slice(topology)
    except ValueError as e:
        raise SizingError(str(e)) from None
    model_config = architecture(config, model, model_config_path)
    validated(config, model_config)
    devices = topology_devices(slice_)
    shape = mesh_lib.mesh_shape(config.mesh, len(devices))
    fitted = fitted_to_slice(config, shape, explicit)  # a child fits its own command line alike
    config = with_overrides(config, fitted)
    if record_to:
        records = compile_all(config, model_config, slice_, devices, programs)
        write_json_atomic(record_to, [r.to_dict() for r in records])
        return None
    if fitted:
        print(f"fitted to {slice_.name} (data x fsdp = {shape[0] * shape[1]} does not divide the "
              f"config's micro-batch): {' '.join(fitted)}", flush=True)
    print(f"compile check: {config.task} on {slice_.name} ({slice_.topology}, {len(devices)} chips "
          f"of {slice_.chip.hbm_bytes / GIB:.0f} GiB), mesh data x fsdp x tensor = "
          f"{'x'.join(map(str, shape))}", flush=True)
    records = compile_all(config, model_config, slice_, devices, programs, isolate=isolate)
    report: dict[str, Any] = {
        "task": config.task, "topology": slice_.topology, "slice": slice_.name,
        "chip": dataclasses.asdict(slice_.chip), "model": dataclasses.asdict(model_config),
        "config": json.loads(json.dumps(config.to_dict(), default=str)), "fitted_overrides": fitted,
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
        report["search"] = search = search_micro_batch(config, model_config, slice_, devices, isolate)
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
