"""A compiled program's record: the compiler's memory and cost analyses per chip, whether it fits
the chip's HBM, the attention kernels in it, and the time it predicts (roofline of the compiled
FLOPs and bytes against the chip's constants)."""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

from dirl_jax.sizing.chips import GIB, Chip
from dirl_jax.sizing.programs import Program

MOSAIC_CALL = "tpu_custom_call"  # the custom-call target of a Mosaic (Pallas TPU) kernel
OUT_OF_HBM = "out of HBM:"


@dataclasses.dataclass
class Record:
    """One program's row of ``compile_report.json`` (bytes and FLOPs per chip)."""

    program: str
    topology: str
    chips: int
    mesh: dict[str, int]
    attention_impl: str
    mosaic_calls: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int
    peak_bytes: int
    hbm_bytes: int
    fits: bool
    headroom: float
    flops: float
    bytes_accessed: float
    predicted_seconds: float
    compile_seconds: float
    detail: str
    fields_to_change: str
    engine: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return dict(cost or {})


def attention_summary(impls: list[str]) -> str:
    """``splash`` / ``tiled+reference`` ...: the implementations a program calls, most used first."""
    counts = collections.Counter(impls)
    return "+".join(name for name, _ in counts.most_common()) or "none"


def _identity(program: Program, topology: str, chip: Chip) -> dict[str, Any]:
    mesh = program.mesh
    return dict(program=program.name, topology=topology, chips=mesh.devices.size,
                mesh={name: int(size) for name, size in mesh.shape.items()},
                hbm_bytes=chip.hbm_bytes, detail=program.detail, engine=program.engine,
                fields_to_change=program.fields_to_change)


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def compiler_hbm_usage(text: str) -> int:
    """The HBM bytes the TPU compiler's out-of-memory message says the program needs
    (``Used 20.2G of 15.75G hbm``, else ``total memory required for HLO temporaries (20.23G)``),
    0 when it says none."""
    found = (re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", text)
             or re.search(r"total memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)", text))
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0


def failed_record(program: Program, topology: str, chip: Chip, error: str, seconds: float,
                  peak_bytes: int = 0, attention_impl: str | None = None) -> Record:
    """The record of a program that did not compile (``error`` says why; ``peak_bytes``: what
    the compiler said it needs, when it ran out of HBM)."""
    return Record(**_identity(program, topology, chip),
                  attention_impl=attention_impl or attention_summary(program.attention_impls),
                  mosaic_calls=0, argument_bytes=0, output_bytes=0, temp_bytes=0, code_bytes=0,
                  alias_bytes=0, peak_bytes=peak_bytes, fits=False, headroom=0.0, flops=0.0, bytes_accessed=0.0,
                  predicted_seconds=0.0, compile_seconds=seconds, error=error)


def compile_program(program: Program, topology: str, chip: Chip) -> Record:
    """Lowers and compiles ``program``; a compile failure is a record with ``error`` set."""
    base = _identity(program, topology, chip)
    start = time.time()
    try:
        compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's message is the report's
        text = str(e).strip()
        out_of_memory = re.search(r"the total memory required.*?exceeds available HBM \([^)]*\)", text)
        if out_of_memory or "CompileTimeHbmOom" in text:  # the TPU compiler's verdict: no fit
            first = f"{OUT_OF_HBM} " + (out_of_memory.group(0) if out_of_memory
                                        else text.split("CompileTimeHbmOom:", 1)[1].strip().splitlines()[0])
        else:
            first = text.splitlines()[0] if text else type(e).__name__
        return failed_record(program, topology, chip, f"{type(e).__name__}: {first}",
                             time.time() - start, peak_bytes=compiler_hbm_usage(text))
    seconds = time.time() - start
    memory = compiled.memory_analysis()
    argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temp, code, alias = (memory.temp_size_in_bytes, memory.generated_code_size_in_bytes,
                         memory.alias_size_in_bytes)
    peak = argument + output + temp + code - alias
    cost = _cost(compiled)
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return Record(**base, attention_impl=attention_summary(program.attention_impls),
                  mosaic_calls=compiled.as_text().count(MOSAIC_CALL),
                  argument_bytes=argument, output_bytes=output, temp_bytes=temp, code_bytes=code,
                  alias_bytes=alias, peak_bytes=peak, fits=peak <= chip.hbm_bytes,
                  headroom=1.0 - peak / chip.hbm_bytes, flops=flops, bytes_accessed=accessed,
                  predicted_seconds=max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth),
                  compile_seconds=seconds)


def table(records: list[Record]) -> str:
    """The records as a Markdown table (GiB per chip, TFLOP per chip)."""
    lines = ["| program | mesh d×f×t | attention (Mosaic calls) | peak GiB / HBM | headroom | "
             "temp GiB | TFLOP | predicted s | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mesh = "x".join(str(v) for v in r.mesh.values())
        if r.error:
            lines.append(f"| {r.program} | {mesh} | {r.attention_impl} | compile failed: "
                         f"{r.error[:80]} | | | | | {r.compile_seconds:.0f} |")
            continue
        lines.append(f"| {r.program} | {mesh} | {r.attention_impl} ({r.mosaic_calls}) | "
                     f"{r.peak_bytes / GIB:.2f} / {r.hbm_bytes / GIB:.0f}{'' if r.fits else ' ✗'} | "
                     f"{100 * r.headroom:.0f} % | {r.temp_bytes / GIB:.2f} | {r.flops / 1e12:.2f} | "
                     f"{r.predicted_seconds:.3g} | {r.compile_seconds:.0f} |")
    return "\n".join(lines)


def problems(records: list[Record]) -> list[str]:
    """One line per program that did not compile or does not fit, naming what to change."""
    out = []
    for r in records:
        if OUT_OF_HBM in r.error:
            out.append(f"{r.program} does not fit a {r.topology} chip "
                       f"({r.error.split(OUT_OF_HBM, 1)[1].strip()}); change {r.fields_to_change}")
        elif r.error:
            out.append(f"{r.program} does not compile for {r.topology}: {r.error}")
        elif not r.fits:
            out.append(f"{r.program} needs {r.peak_bytes / GIB:.1f} GiB per chip but a "
                       f"{r.topology} chip has {r.hbm_bytes / GIB:.0f} GiB of HBM; change "
                       f"{r.fields_to_change}")
    return out
