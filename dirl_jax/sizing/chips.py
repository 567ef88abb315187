"""TPU chips and slices: per-chip constants (HBM, peak bf16 FLOP/s, HBM bandwidth) and the slice
names users rent (``v5p-64``) as the topologies the TPU compiler takes (``v5p:2x4x4``)."""

from __future__ import annotations

import dataclasses
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's constants (per chip, both TensorCores of a v5p megacore)."""

    name: str
    hbm_bytes: int
    peak_flops: float        # dense bf16 FLOP/s
    hbm_bandwidth: float     # bytes/s
    source: str


# Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
}
# the device_kind JAX reports -> chip
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
SLICE_ALIASES = {"v5litepod": "v5e"}
# chips of a slice -> topology; v4 and v5p slices are named by TensorCores (2 per chip)
_TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                  256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                  256: "16x16"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: ``name`` as given, the compiler's ``topology`` and the chip type."""

    name: str
    topology: str
    chip: Chip

    @property
    def chips(self) -> int:
        count = 1
        for size in self.topology.split(":")[1].split("x"):
            count *= int(size)
        return count


def parse_slice(name: str) -> Slice:
    """``v5p-64`` / ``v5litepod-256`` / ``v6e-64`` (slice names) or ``v5p:2x4x4`` (topologies)."""
    text = name.strip().lower()
    topology = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    if topology:
        kind, shape = topology.groups()
        kind = SLICE_ALIASES.get(kind, kind)
        if kind not in CHIPS:
            raise ValueError(f"--topology {name}: unknown TPU type {kind!r}; known: {', '.join(CHIPS)}")
        return Slice(name, f"{kind}:{shape}", CHIPS[kind])
    named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if not named:
        raise ValueError(f"--topology {name}: expected a slice name such as v5p-64, v5litepod-256, "
                         "v6e-64, or a topology such as v5p:2x4x4")
    kind, count = SLICE_ALIASES.get(named.group(1), named.group(1)), int(named.group(2))
    if kind not in CHIPS:
        raise ValueError(f"--topology {name}: unknown TPU type {kind!r}; known: {', '.join(CHIPS)}")
    cores = _CORES_PER_CHIP[kind]
    chips, table = count // cores, _TOPOLOGIES_3D if cores == 2 else _TOPOLOGIES_2D
    if count % cores or chips not in table:
        sizes = ", ".join(f"{kind}-{c * cores}" for c in table)
        raise ValueError(f"--topology {name}: no {kind} slice of that size; known: {sizes}")
    return Slice(name, f"{kind}:{table[chips]}", CHIPS[kind])


def chip_of(device_kind: str) -> Chip:
    """The chip constants of a JAX ``device_kind`` (e.g. ``TPU v5``)."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"no chip constants for device kind {device_kind!r}; known: "
                         f"{', '.join(DEVICE_KINDS)}")
    return CHIPS[DEVICE_KINDS[device_kind]]
