"""Scale-out pieces: dirl_jax.distributed (environment detection, initialize), the mesh planner
(dirl_jax/sizing/plan.py, scripts/plan_mesh.py) and the TPU-pod / SLURM launch scripts."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import free_port
from dirl_jax import canvas, distributed
from dirl_jax.distributed import DistributedInfo, detect_environment, parse_slurm_nodelist, resolve
from dirl_jax.model import SDARConfig, abstract_model, parameter_shapes

from dirl_jax.sizing import plan as mesh_plan  # the planner behind scripts/plan_mesh.py

REPO = pathlib.Path(__file__).resolve().parents[1]

CLUSTER_VARS = ("DIRL_COORDINATOR", "DIRL_NUM_PROCESSES", "DIRL_PROCESS_ID", "DIRL_COORDINATOR_PORT",
                "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST", "SLURM_LOCALID", *distributed.TPU_ENV_HINTS,
                "JAX_COORDINATOR_ADDRESS")


# ----------------------------------------------------------------------------- SLURM nodelists
@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("node[01-02,07],gpu[1-2]", ["node01", "node02", "node07", "gpu1", "gpu2"]),
    ("a1,b2,c3", ["a1", "b2", "c3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("10.0.0.1", ["10.0.0.1"]),
])
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-", "node01]", "node[a-b]", "node[3-1]", "a,,b",
                                      "n[1-[2]]"])
def test_parse_slurm_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="malformed SLURM nodelist"):
        parse_slurm_nodelist(nodelist)


# ----------------------------------------------------------------------------- detection
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
             "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]"}


def test_detects_slurm():
    assert detect_environment(SLURM_ENV) == DistributedInfo("slurm", 4, 3, "gpu07:12345")
    job_only = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_environment({**job_only, "DIRL_COORDINATOR_PORT": "2222"}).coordinator == "gpu07:2222"


def test_slurm_errors_name_the_variable():
    no_nodelist = {k: v for k, v in SLURM_ENV.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        detect_environment(no_nodelist)
    with pytest.raises(ValueError, match="SLURM_PROCID must be an integer in"):
        detect_environment({**SLURM_ENV, "SLURM_PROCID": "4"})
    with pytest.raises(ValueError, match="DIRL_COORDINATOR_PORT must be a TCP port"):
        detect_environment({**SLURM_ENV, "DIRL_COORDINATOR_PORT": "70000"})


def test_detects_explicit_env_before_slurm():
    env = {**SLURM_ENV, "DIRL_COORDINATOR": "10.0.0.1:999", "DIRL_NUM_PROCESSES": "2",
           "DIRL_PROCESS_ID": "1"}
    assert detect_environment(env) == DistributedInfo("env", 2, 1, "10.0.0.1:999")


@pytest.mark.parametrize("env, message", [
    ({"DIRL_NUM_PROCESSES": "2"}, "DIRL_COORDINATOR and DIRL_PROCESS_ID required"),
    ({"DIRL_PROCESS_ID": "0"}, "DIRL_NUM_PROCESSES is required"),
    ({"DIRL_COORDINATOR": "h:1", "DIRL_NUM_PROCESSES": "two", "DIRL_PROCESS_ID": "0"},
     "DIRL_NUM_PROCESSES must be an integer, got 'two'"),
    ({"DIRL_COORDINATOR": "host", "DIRL_NUM_PROCESSES": "2", "DIRL_PROCESS_ID": "0"},
     "DIRL_COORDINATOR must be 'host:port'"),
])
def test_partial_or_malformed_env_is_an_error(env, message):
    with pytest.raises(ValueError, match=message):
        detect_environment(env)


def test_detects_tpu_and_nothing():
    tpu = DistributedInfo("tpu", None, None)
    assert detect_environment({"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_WORKER_ID": "1"}) == tpu
    assert detect_environment({"CLOUD_TPU_TASK_ID": "0"}) == tpu
    assert detect_environment({}, tpu_vm=True) == tpu
    assert detect_environment({"HOME": "/root"}) is None


# ----------------------------------------------------------------------------- arguments
def test_explicit_arguments_win():
    info = resolve("10.1.2.3:1234", 8, 7, SLURM_ENV, tpu_vm=True)
    assert info == DistributedInfo("explicit", 8, 7, "10.1.2.3:1234")
    assert resolve(None, 1, None, SLURM_ENV) == DistributedInfo("explicit", 1, 0)
    assert resolve(None, None, None, {}) == distributed.SINGLE_PROCESS


@pytest.mark.parametrize("args, message", [
    (("h:1", 2, 2), r"process_id must be an integer in \[0, num_processes=2\), got 2"),
    (("h:1", 2, -1), "process_id must be an integer in"),
    (("h:1", 0, 0), "num_processes must be a positive integer, got 0"),
    (("h:1", None, 0), "num_processes is required when coordinator or process_id is given"),
    ((None, 4, 1), "coordinator required with num_processes=4"),
    (("h:1", 4, None), "process_id required with num_processes=4"),
    (("10.0.0.1", 2, 0), "coordinator must be 'host:port' of process 0"),
    (("10.0.0.1:http", 2, 0), "coordinator must be 'host:port'"),
    ((None, 1, 1), "process_id must be 0 with num_processes=1"),
])
def test_argument_validation(args, message):
    with pytest.raises(ValueError, match=message):
        resolve(*args, {})


# ----------------------------------------------------------------------------- initialize
@pytest.fixture
def fresh(monkeypatch):
    """No cluster variables, no TPU, no earlier initialize(); records jax.distributed calls."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_INFO", None)
    monkeypatch.setattr(distributed, "tpu_chips_present", lambda: False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    return calls


def test_initialize_without_cluster_is_a_single_process_no_op(fresh):
    info = distributed.initialize()
    assert info == distributed.SINGLE_PROCESS and str(info) == "process 0 of 1 [single]"
    assert distributed.initialize() is info
    assert fresh == []


def test_initialize_passes_explicit_values_and_is_idempotent(fresh):
    info = distributed.initialize("10.0.0.1:1234", 2, 1)
    assert info == DistributedInfo("explicit", 2, 1, "10.0.0.1:1234")
    assert fresh == [(("10.0.0.1:1234", 2, 1),
                      {"local_device_ids": None, "cluster_detection_method": "deactivate"})]
    assert distributed.initialize("10.9.9.9:1", 4, 3) is info
    assert len(fresh) == 1


def test_initialize_on_tpu_lets_jax_detect_the_pod(fresh, monkeypatch):
    monkeypatch.setattr(distributed, "tpu_chips_present", lambda: True)
    info = distributed.initialize()
    assert fresh == [((), {"local_device_ids": None})]
    assert info == DistributedInfo("tpu", jax.process_count(), jax.process_index())


WORKER = """
import sys
import jax
from dirl_jax import distributed
info = distributed.initialize()
result = f"{info.source} {info.process_id} {jax.process_count()} {jax.device_count()}"
open(sys.argv[1], "w").write(result)  # a file: the runtime's own threads share stdout/stderr
jax.distributed.shutdown()
"""


def test_two_processes_join_through_slurm_variables(tmp_path):
    """A real two-process CPU run whose layout comes only from SLURM variables."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                SLURM_JOB_ID="1", SLURM_NTASKS="2", SLURM_STEP_NODELIST="127.0.0.1",
                DIRL_COORDINATOR_PORT=str(port))
    results = [tmp_path / f"result{i}.txt" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(results[i])], cwd=tmp_path,
                                text=True,
                                env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    for i, (worker, out) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, out
        assert results[i].read_text() == f"slurm {i} 2 4", out


# ----------------------------------------------------------------------------- mesh planner
def test_parameter_count_hand_checked_for_sdar_8b():
    # embed + untied head 2 x 151936 x 4096, 36 layers of (attention 4096 x 128 x (2 x 32 + 2 x 8)
    # + SwiGLU 3 x 4096 x 12288 + norms 2 x 4096 + 2 x 128), final norm 4096
    assert mesh_plan.parameter_count(mesh_plan.SDAR_MODELS["SDAR-8B"]) == (
        2 * 151936 * 4096 + 36 * (4096 * 128 * 80 + 3 * 4096 * 12288 + 2 * 4096 + 256) + 4096)


def test_sdar_8b_matches_the_released_config(shared_dir):
    released = SDARConfig.from_pretrained(shared_dir / "data" / "sdar_tokenizer")
    architecture = released.replace(bos_token_id=None, eos_token_id=None)
    assert mesh_plan.SDAR_MODELS["SDAR-8B"] == architecture  # every other field compared


@pytest.mark.parametrize("name", list(mesh_plan.SDAR_MODELS))
def test_parameter_count_matches_the_model(name):
    config = mesh_plan.SDAR_MODELS[name]
    counted = sum(int(np.prod(shape)) for shape in parameter_shapes(abstract_model(config)).values())
    assert mesh_plan.parameter_count(config) == counted  # exact, not just within 0.1 %


def test_visible_pairs_match_the_two_stream_mask():
    n, block = 24, 4
    clean = np.arange(n)[None]
    c, _ = canvas.two_stream_canvas(clean, clean, clean, np.zeros_like(clean), block)
    assert int(canvas.dense_mask(c).sum()) == mesh_plan.two_stream_visible_pairs(n, block)
    with pytest.raises(ValueError, match="multiple of block_size"):
        mesh_plan.two_stream_visible_pairs(10, 4)


def test_memory_decreases_with_fsdp_and_remat():
    config, workload = mesh_plan.SDAR_MODELS["SDAR-8B"], mesh_plan.Workload()
    totals = [mesh_plan.memory_per_device(config, workload, mesh_plan.MeshShape(256 // f, f, 1)).total
              for f in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    remat = mesh_plan.activation_bytes_per_row(config, 16384, 1, remat=True)
    assert remat < mesh_plan.activation_bytes_per_row(config, 16384, 1, remat=False) / 5
    # full remat keeps the 36 layer inputs: 16384 tokens x 4096 x 2 B x 36 = 4.5 GiB, plus one layer
    assert remat > 16384 * 4096 * 2 * 36


def test_the_decode_loop_plans_a_compute_dtype_copy_of_the_weights():
    """The compiled 8B chunk holds 15.6 GiB more than one forward on v5p-64 (docs/SCALING.md):
    the bf16 weights XLA hoists out of the loop, planned beside the fp32 ones."""
    from ml_collections import ConfigDict
    c = mesh_plan.SDAR_MODELS["SDAR-8B"]
    mesh = mesh_plan.MeshShape(4, 1, 1)

    def planned(program: str, compute: str, param: str = "float32") -> float:
        config = ConfigDict(dict(train=dict(param_dtype=param, compute_dtype=compute)))
        return mesh_plan.rollout_bytes(program, c, config, mesh, slots=64, capacity=9220)

    one_forward = planned("rollout_block_step", "bfloat16")
    assert planned("rollout_chunk", "bfloat16") - one_forward == 2 * mesh_plan.parameter_count(c)
    assert planned("rollout_chunk", "float32") == planned("rollout_block_step", "float32")
    assert planned("rollout_chunk", "bfloat16", "bfloat16") == one_forward - 2 * mesh_plan.parameter_count(c)
    # 16 of the 64 slots per chip: fp32 weights + their cache, 50.8 GiB (the compiler: 51.2)
    assert one_forward / mesh_plan.GIB == pytest.approx(50.8, abs=0.1)


def test_chosen_meshes_are_valid():
    workload = mesh_plan.Workload()
    plans = mesh_plan.plan_all(mesh_plan.SDAR_MODELS, mesh_plan.HARDWARE, workload)
    assert len(plans) == 3 * len(mesh_plan.HARDWARE)
    for plan in plans:
        config, mesh = mesh_plan.SDAR_MODELS[plan.model], plan.mesh
        assert mesh.devices == plan.hardware.chips
        assert config.num_key_value_heads % mesh.tensor == 0 and config.hidden_size % mesh.fsdp == 0
        assert plan.grad_accum * plan.micro_rows * mesh.data * mesh.fsdp == workload.global_batch
        if plan.fits:
            assert plan.memory.total <= 0.8 * plan.hardware.hbm_gib * mesh_plan.GIB
    by_key = {(p.model, p.hardware.name): p for p in plans}
    assert str(by_key["SDAR-8B", "8xH100"].mesh) == "2x4x1"
    assert not by_key["SDAR-8B", "v5litepod-8"].fits
    # 832 TFLOP per row x 512 rows / (8 x 989 TFLOP/s x 0.4) = 135 s
    assert by_key["SDAR-8B", "8xH100"].step_seconds == pytest.approx(134.6, abs=0.5)


def test_plan_mesh_script_writes_json(tmp_path):
    out = tmp_path / "plans.json"
    result = subprocess.run([sys.executable, "scripts/plan_mesh.py", "--models", "SDAR-1.7B",
                             "--hardware", "8xH100", "v5p-128", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| SDAR-1.7B | 8xH100" in result.stdout.replace("  ", "")
    plans = json.loads(out.read_text())["plans"]
    assert [p["hardware"]["name"] for p in plans] == ["v5p-128", "8xH100"]
    assert not (tmp_path / "plans.json.tmp").exists()


# ----------------------------------------------------------------------------- launch scripts
SCRIPTS = ("scripts/tpu_pod_launch.sh", "scripts/gpu_cluster_launch.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0
    assert (REPO / script).stat().st_mode & stat.S_IXUSR
    usage = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 0 and "Usage:" in usage.stdout


def test_tpu_launch_dry_run_prints_the_gcloud_commands():
    result = subprocess.run(
        ["bash", "scripts/tpu_pod_launch.sh", "--dry-run", "--name", "dirl-pod", "--zone", "us-east5-a",
         "--create", "--accelerator-type", "v5p-128", "--workers", "2", "--",
         "python", "-m", "dirl_jax.train", "--config", "configs/sft_sdar8b.py"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert ("+ gcloud compute tpus tpu-vm create dirl-pod --zone=us-east5-a "
            "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5") in lines
    ssh = [line for line in lines if line.startswith("+ gcloud compute tpus tpu-vm ssh dirl-pod")]
    assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
    assert "bash scripts/setup.sh" in ssh[0] and ".[tpu]" in ssh[0]
    assert "{ python -m dirl_jax.train --config configs/sft_sdar8b.py; }" in ssh[1]
    assert "tee runs/launch/" in ssh[1] and "$(hostname).log" in ssh[1]
    collect = [line for line in lines if "tpu-vm scp --recurse dirl-pod:dirl-jax/runs/launch/" in line]
    assert [line.split()[-1] for line in collect] == ["--worker=0", "--worker=1"]


def test_tpu_launch_requires_a_command():
    result = subprocess.run(["bash", "scripts/tpu_pod_launch.sh", "--name", "x", "--zone", "z"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "no command given after --" in result.stderr


def test_gpu_launch_dry_run_prints_the_srun_command(tmp_path):
    fake_scontrol = tmp_path / "scontrol"
    fake_scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu01\\ngpu02\\n"\n')
    fake_scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", "scripts/gpu_cluster_launch.sh", "--dry-run", "--port", "2222",
                             "--config", "configs/sft_sdar8b.py"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "coordinator gpu01:2222" in result.stdout
    assert (f"+ srun --ntasks-per-node=1 --kill-on-bad-exit=1 {REPO}/.venv/bin/python -u "
            "-m dirl_jax.train --config configs/sft_sdar8b.py") in result.stdout
    outside = subprocess.run(["bash", "scripts/gpu_cluster_launch.sh", "--config", "x"], cwd=REPO,
                             env={k: v for k, v in env.items() if not k.startswith("SLURM")},
                             capture_output=True, text=True)
    assert outside.returncode == 2 and "not inside a SLURM allocation" in outside.stderr


def test_allgather_objects_in_one_process_is_the_value_itself():
    value = {"tokens": [1, 2, 3], "text": "x"}
    assert distributed.allgather_objects(value) == [value]
