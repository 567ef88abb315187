"""Joining a multi-process JAX run: a thin layer over :func:`jax.distributed.initialize`.

Where the process's place in the run comes from, first match wins:

1. explicit arguments (the trainers' ``--coordinator``, ``--num_processes``, ``--process_id``);
2. ``DIRL_COORDINATOR`` / ``DIRL_NUM_PROCESSES`` / ``DIRL_PROCESS_ID``;
3. SLURM (``SLURM_JOB_ID``, ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_STEP_NODELIST`` or
   ``SLURM_JOB_NODELIST``): the coordinator is the first host of the nodelist, port
   ``DIRL_COORDINATOR_PORT`` (default 12345);
4. a Cloud TPU VM (TPU chips on the PCI bus, or ``TPU_WORKER_HOSTNAMES`` / ``TPU_WORKER_ID`` /
   ``CLOUD_TPU_TASK_ID`` / ``MEGASCALE_COORDINATOR_ADDRESS``): ``jax.distributed.initialize()``
   with no arguments, which reads the pod's layout from the TPU metadata;
5. nothing: one process, and ``jax.distributed`` is not touched.

When the coordinator, process count and id are known here, JAX's own cluster detection is
switched off, so a SLURM task keeps all GPUs of its node (JAX would otherwise restrict it to the
GPU numbered ``SLURM_LOCALID``, its one-GPU-per-task convention).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

COORDINATOR_ENV = "DIRL_COORDINATOR"
NUM_PROCESSES_ENV = "DIRL_NUM_PROCESSES"
PROCESS_ID_ENV = "DIRL_PROCESS_ID"
COORDINATOR_PORT_ENV = "DIRL_COORDINATOR_PORT"
DEFAULT_COORDINATOR_PORT = 12345
SLURM_NODELIST_ENVS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                 "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")
_ARGUMENT_NAMES = ("coordinator", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """This process's place in the run and where that came from.

    ``source`` is ``explicit``, ``env`` (``DIRL_*``), ``slurm``, ``tpu`` or ``single``. Before
    initialisation a ``tpu`` info has no process count or id (JAX reads them from the TPU
    metadata); :func:`initialize` returns them filled in.
    """

    source: str
    num_processes: int | None
    process_id: int | None
    coordinator: str | None = None

    def __str__(self) -> str:
        where = f" (coordinator {self.coordinator})" if self.coordinator else ""
        return f"process {self.process_id} of {self.num_processes} [{self.source}]{where}"


SINGLE_PROCESS = DistributedInfo("single", num_processes=1, process_id=0)
_INFO: DistributedInfo | None = None


# ----------------------------------------------------------------------------- pure parsing
def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM nodelist: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07
    gpu5 (zero padding kept; several bracket groups in one name expand as a product)."""
    try:
        hosts = [host for item in _split_top_level(nodelist) for host in _expand_hostname(item)]
    except ValueError as e:
        raise ValueError(f"malformed SLURM nodelist {nodelist!r}: {e}") from None
    if not hosts:
        raise ValueError(f"malformed SLURM nodelist {nodelist!r}: no host names")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Splits at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError("unbalanced or nested brackets")
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError("unclosed '['")
    items.append(nodelist[start:])
    if any(not item.strip() for item in items):
        raise ValueError("empty host name")
    return [item.strip() for item in items]


def _expand_hostname(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    return [head + number + rest for number in _expand_ranges(match.group(1))
            for rest in _expand_hostname(tail)]


def _expand_ranges(spec: str) -> list[str]:
    """``01-03,7`` -> 01 02 03 7 (the width of a range's first number is kept)."""
    numbers = []
    for part in spec.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} (expected N or N-M)")
        if dash and int(high) < int(low):
            raise ValueError(f"descending range {part!r}")
        last = int(high) if dash else int(low)
        numbers += [str(n).zfill(len(low)) for n in range(int(low), last + 1)]
    return numbers


def detect_environment(env: Mapping[str, str], *, tpu_vm: bool = False) -> DistributedInfo | None:
    """The run layout that ``env`` (and ``tpu_vm``: TPU chips on this machine) describe, or None.

    ``DIRL_*`` variables win over SLURM, SLURM over TPU. Partial or malformed settings raise
    ``ValueError`` naming the variable.
    """
    if any(name in env for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)):
        return _checked_info(env.get(COORDINATOR_ENV), _env_int(env, NUM_PROCESSES_ENV),
                             _env_int(env, PROCESS_ID_ENV), source="env",
                             names=(COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV))
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return _slurm_info(env)
    if tpu_vm or any(name in env for name in TPU_ENV_HINTS):
        return DistributedInfo("tpu", num_processes=None, process_id=None)
    return None


def _slurm_info(env: Mapping[str, str]) -> DistributedInfo:
    nodelist = next((env[name] for name in SLURM_NODELIST_ENVS if env.get(name)), None)
    if nodelist is None:
        raise ValueError(f"SLURM_JOB_ID is set but neither of {' / '.join(SLURM_NODELIST_ENVS)} is: "
                         "run the trainer under srun inside the allocation")
    if "SLURM_NTASKS" not in env:
        raise ValueError("SLURM_JOB_ID is set but SLURM_NTASKS is not: run the trainer under srun")
    port = _env_int(env, COORDINATOR_PORT_ENV)
    port = DEFAULT_COORDINATOR_PORT if port is None else port
    if not 0 < port < 65536:
        raise ValueError(f"{COORDINATOR_PORT_ENV} must be a TCP port in [1, 65535], got {port}")
    coordinator = f"{parse_slurm_nodelist(nodelist)[0]}:{port}"
    return _checked_info(coordinator, _env_int(env, "SLURM_NTASKS"), _env_int(env, "SLURM_PROCID"),
                         source="slurm", names=("SLURM coordinator", "SLURM_NTASKS", "SLURM_PROCID"))


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    if name not in env:
        return None
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {env[name]!r}") from None


# ----------------------------------------------------------------------------- validation
def _checked_info(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
                  source: str, names: Sequence[str] = _ARGUMENT_NAMES) -> DistributedInfo:
    """A validated :class:`DistributedInfo`; ``names`` spell the three settings in errors
    (argument names, flags or environment variables)."""
    coordinator_name, count_name, id_name = names
    if num_processes is None:
        raise ValueError(f"{count_name} is required when {coordinator_name} or {id_name} is given")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"{count_name} must be a positive integer, got {num_processes!r}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"{id_name} must be 0 with {count_name}=1, got {process_id!r}")
        return DistributedInfo(source, 1, 0, coordinator)
    missing = [name for name, value in ((coordinator_name, coordinator), (id_name, process_id))
               if value is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required with {count_name}={num_processes}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) \
            or not 0 <= process_id < num_processes:
        raise ValueError(f"{id_name} must be an integer in [0, {count_name}={num_processes}), "
                         f"got {process_id!r}")
    _check_coordinator(coordinator, coordinator_name)
    return DistributedInfo(source, num_processes, process_id, coordinator)


def _check_coordinator(coordinator: str, name: str) -> None:
    host, colon, port = coordinator.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{name} must be 'host:port' of process 0 (e.g. 10.0.0.1:12345), "
                         f"got {coordinator!r}")


def resolve(coordinator: str | None, num_processes: int | None, process_id: int | None,
            env: Mapping[str, str], *, tpu_vm: bool = False) -> DistributedInfo:
    """What :func:`initialize` would join, without touching JAX."""
    if (coordinator, num_processes, process_id) != (None, None, None):
        return _checked_info(coordinator, num_processes, process_id, source="explicit")
    return detect_environment(env, tpu_vm=tpu_vm) or SINGLE_PROCESS


# ----------------------------------------------------------------------------- side effects
def tpu_chips_present() -> bool:
    """True on a Cloud TPU VM: TPU chips on the PCI bus, found the way JAX finds them."""
    from jax._src import hardware_utils  # private, but stable within the pinned jax<0.11
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: Sequence[int] | None = None) -> DistributedInfo:
    """Joins the run this process belongs to (see the module docstring) and returns its place.

    Call it first, before any JAX computation. Idempotent: later calls return the first
    call's info. ``local_device_ids`` restricts the devices this process drives (multi-process
    runs only). The trainers pass their flags straight through::

        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    """
    global _INFO
    if _INFO is None:
        info = resolve(coordinator, num_processes, process_id, os.environ,
                       tpu_vm=tpu_chips_present())
        _INFO = _start(info, local_device_ids)
    return _INFO


def _start(info: DistributedInfo, local_device_ids: Sequence[int] | None) -> DistributedInfo:
    if info.source == "tpu":
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return dataclasses.replace(info, num_processes=jax.process_count(),
                                   process_id=jax.process_index())
    if info.num_processes > 1:
        jax.distributed.initialize(info.coordinator, info.num_processes, info.process_id,
                                   local_device_ids=local_device_ids,
                                   cluster_detection_method="deactivate")
        # one collective while every process is at the same point: on CPU this creates the gloo
        # context, whose rendezvous times out after 30 s if one process is still compiling
        multihost_utils.sync_global_devices("dirl_jax.distributed: every process joined")
    return info


def define_flags() -> None:
    """Defines ``--coordinator --num_processes --process_id`` (the command lines call it before
    parsing; nothing is defined on import)."""
    flags.DEFINE_string("coordinator", None,
                        "HOST:PORT of process 0 of a multi-host run (default: detected)")
    flags.DEFINE_integer("num_processes", None, "processes in the run (default: detected)")
    flags.DEFINE_integer("process_id", None, "this process's index (default: detected)")


def initialize_from_flags() -> DistributedInfo:
    """:func:`initialize` with the flags of :func:`define_flags` (``python -m dirl_jax.train`` /
    ``dirl_jax.evaluate`` command lines)."""
    f = flags.FLAGS
    return initialize(f.coordinator, f.num_processes, f.process_id)


def allgather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in process order; ``[value]`` in a one-process run.
    A collective: every process calls it at the same point."""
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, :int(n)].tobytes()) for i, n in enumerate(sizes.reshape(-1))]
