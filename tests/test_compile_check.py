"""dirl_jax.compile_check: the run's programs compiled for a TPU slice by the real XLA:TPU and
Mosaic compilers (in .venv-tpu, from this CPU host), the report's fields, its refusals; and the
pieces that need no TPU compiler (slice names, the search, the report arithmetic on a CPU compile)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirl_jax.compile_check import child_command_line, config_fields, dashed_flags
from dirl_jax.model import SDARConfig
from dirl_jax.sizing import check as check_lib
from dirl_jax.sizing.chips import CHIPS, GIB, Chip, parse_slice
from dirl_jax.sizing.programs import Program
from dirl_jax.sizing.report import compile_program, compiler_hbm_usage, problems

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_PYTHON = REPO / ".venv-tpu" / "bin" / "python"
needs_tpu_compiler = pytest.mark.skipif(
    not TPU_PYTHON.exists(),
    reason=".venv-tpu is absent (no Python >= 3.12 found by scripts/setup_tpu_compile.sh)")
TINY = SDARConfig(vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, block_size=4,
                  mask_token_id=3)
SFT_TINY = ["--config", "configs/sft_tiny.py", "--config.data.max_length=128",
            "--config.model.num_hidden_layers=2", "--config.mesh.fsdp=2", "--topology", "v5p:2x2x1"]


@pytest.fixture(scope="module")
def tiny_model_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY.to_hf_dict()))
    return str(path)


def compile_check(args: list[str], out: pathlib.Path) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([str(TPU_PYTHON), "-m", "dirl_jax.compile_check", *args, "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    report = out / "compile_report.json"
    return result, (json.loads(report.read_text()) if report.exists() else {})


def by_program(report: dict) -> dict[str, dict]:
    return {r["program"]: r for r in report["records"]}


# ----------------------------------------------------------------------------- the TPU compiler
@pytest.fixture(scope="module")
def sft_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return compile_check(SFT_TINY, tmp_path_factory.mktemp("sft"))


@needs_tpu_compiler
def test_sft_step_compiles_with_splash_and_reports_every_field(sft_report):
    result, report = sft_report
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = report["records"]
    assert record["program"] == "sft_train_step"
    assert record["topology"] == "v5p:2x2x1" and record["chips"] == 4
    assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert record["attention_impl"] == "splash" and record["mosaic_calls"] >= 3  # fwd, dq, dkv
    assert record["fits"] and 0 < record["headroom"] <= 1
    assert record["hbm_bytes"] == CHIPS["v5p"].hbm_bytes
    assert record["flops"] > 0 and record["bytes_accessed"] > 0 and record["predicted_seconds"] > 0
    assert record["peak_bytes"] == (record["argument_bytes"] + record["output_bytes"]
                                    + record["temp_bytes"] + record["code_bytes"] - record["alias_bytes"])
    assert record["alias_bytes"] > 0  # parameters and optimizer state are donated
    assert "| sft_train_step | 2x2x1 | splash" in result.stdout


@needs_tpu_compiler
def test_doubling_the_micro_batch_raises_temp_bytes(sft_report, tmp_path):
    _, base = sft_report
    result, doubled = compile_check([*SFT_TINY, "--config.train.global_batch=32"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert by_program(doubled)["sft_train_step"]["temp_bytes"] > by_program(base)["sft_train_step"]["temp_bytes"]


@needs_tpu_compiler
def test_auto_attention_on_v6e_is_the_schedule_driven_kernel(tmp_path):
    """Chosen by the slice's device kind (XLA:TPU aborts on Splash's inputs on v6e at 8B)."""
    result, report = compile_check([*SFT_TINY[:-1], "v6e:2x2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = by_program(report)["sft_train_step"]
    assert record["attention_impl"] == "pallas_tpu" and record["mosaic_calls"] >= 3


@needs_tpu_compiler
def test_dipo_lists_every_program_of_the_run(tiny_model_config, tmp_path):
    result, report = compile_check(
        ["--config", "configs/dipo_tiny.py", "--model-config", tiny_model_config, "--topology",
         "v5p:2x2x1", "--config.rollout.max_prompt_tokens=128", "--config.rollout.slots=8",
         "--config.train.canvas_rows=4", "--config.train.row_length=512"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = by_program(report)
    assert list(records) == ["dipo_gradients", "dipo_apply", "dipo_score", "rollout_prefill",
                             "rollout_block_step", "rollout_chunk"]
    assert all(r["fits"] and r["flops"] > 0 for r in records.values())
    # the prompt prefill is a static block-causal canvas: Splash; decode queries are one block
    assert records["rollout_prefill"]["attention_impl"] == "splash"
    assert records["rollout_prefill"]["mosaic_calls"] > 0
    assert records["rollout_block_step"]["attention_impl"] == "reference"
    assert "fused commit" in records["rollout_block_step"]["detail"]  # TPU: fused, not CPU's separate
    assert records["dipo_gradients"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    # the multi-round canvas's mask is data: the schedule-driven Mosaic kernel, never interpreted
    assert records["dipo_gradients"]["attention_impl"] == "pallas_tpu"
    assert records["dipo_gradients"]["mosaic_calls"] >= 3  # fwd, dk/dv, dq
    assert records["dipo_score"]["attention_impl"] == "pallas_tpu"
    assert records["dipo_score"]["mosaic_calls"] >= 1


@needs_tpu_compiler
def test_a_one_node_recipe_is_fitted_to_a_pod_slice(tiny_model_config, tmp_path):
    """The 8-GPU recipe's 8 canvas rows on v5p-64 (data x fsdp = 4 x 8): compiled at 32 rows, as
    it would run there, in the child that compiles the program too."""
    result, report = compile_check(["--config", "configs/dipo_sdar8b.py", "--model-config",
                                    tiny_model_config, "--topology", "v5p-64", "--programs",
                                    "dipo_apply"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("fitted to v5p-64 (data x fsdp = 32 does not divide the config's micro-batch): "
            "--config.train.canvas_rows=32") in result.stdout
    assert report["fitted_overrides"] == ["--config.train.canvas_rows=32"]
    assert report["config"]["train"]["canvas_rows"] == 32
    assert by_program(report)["dipo_apply"]["mesh"] == {"data": 4, "fsdp": 8, "tensor": 1}


def test_fitting_keeps_the_global_batch_and_the_users_own_fields():
    from dirl_jax.config import dipo_defaults, sft_defaults
    dipo = dipo_defaults()
    dipo.train.canvas_rows = 40
    assert check_lib.fitted_to_slice(dipo, (4, 8, 1)) == ["--config.train.canvas_rows=64"]
    assert check_lib.fitted_to_slice(dipo, (5, 8, 2)) == []
    assert check_lib.fitted_to_slice(dipo, (4, 8, 1), ["train.canvas_rows"]) == []
    sft = sft_defaults()
    sft.train.update(global_batch=512, grad_accum=32)  # 16 rows a micro-batch
    assert check_lib.fitted_to_slice(sft, (8, 4, 1)) == ["--config.train.grad_accum=16"]
    assert check_lib.fitted_to_slice(sft, (2, 4, 2)) == []
    assert check_lib.fitted_to_slice(sft, (8, 4, 1), ["train.grad_accum"]) == []
    sft.train.update(global_batch=480, grad_accum=30)   # 16 rows; 480 = 15 x 32: micro 32
    assert check_lib.fitted_to_slice(sft, (8, 4, 1)) == ["--config.train.grad_accum=15"]
    sft.train.update(global_batch=512, grad_accum=32)
    assert check_lib.fitted_to_slice(sft, (3, 8, 1)) == []  # no multiple of 24 divides 512


@needs_tpu_compiler
def test_a_program_that_does_not_fit_fails_in_one_line(tmp_path):
    result, report = compile_check(
        ["--config", "configs/sft_tiny.py", "--config.data.max_length=8192",
         "--config.train.global_batch=512", "--config.model.num_hidden_layers=2", "--topology",
         "v5litepod-8"], tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    # the TPU compiler's own verdict (CompileTimeHbmOom), with the bytes it counted
    assert error.startswith("error: sft_train_step does not fit a v5e:2x4 chip (the total memory "
                            "required for HLO temporaries (")
    assert "exceeds available HBM (15.75G)); change train.grad_accum" in error
    assert "Traceback" not in result.stderr
    assert not by_program(report)["sft_train_step"]["fits"]


@needs_tpu_compiler
def test_a_mesh_that_does_not_divide_the_heads_is_refused_before_compiling(tmp_path):
    result, report = compile_check([*SFT_TINY[:-2], "--config.mesh.fsdp=1", "--config.mesh.tensor=4",
                                    "--topology", "v5p:2x2x1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.mesh.tensor: (4) must divide the model's num_key_value_heads (2)")
    assert "compiled" not in result.stdout and report == {}


@needs_tpu_compiler
def test_missing_architecture_names_the_flags(tmp_path):
    result, _ = compile_check(["--config", "configs/sft_sdar8b.py", "--topology", "v5p-64"], tmp_path)
    assert result.returncode == 2
    assert "give --model (SDAR-1.7B, SDAR-4B, SDAR-8B) or --model-config PATH" in result.stderr


# ----------------------------------------------------------------------------- no TPU compiler needed
@pytest.mark.parametrize("name,topology,chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32), ("v5p-128", "v5p:4x4x4", 64),
    ("v5litepod-256", "v5e:16x16", 256), ("v5e-8", "v5e:2x4", 8), ("v6e-64", "v6e:8x8", 64),
    ("v5p:2x2x2", "v5p:2x2x2", 8)])
def test_slice_names_map_to_compiler_topologies(name, topology, chips):
    s = parse_slice(name)
    assert (s.topology, s.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-6", "v9-8", "h100-8", "v5p"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(ValueError, match=f"--topology {name}"):
        parse_slice(name)


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 17, 64, 100])
def test_search_finds_the_largest_fitting_candidate(limit):
    candidates = list(range(1, 101))
    tried = []

    def fits(m: int) -> bool:
        tried.append(m)
        return m <= limit
    assert check_lib._largest(fits, candidates) == (limit or None)
    assert len(tried) <= 16  # doubling, then bisection: no linear scan


def test_dashed_flags_become_absl_names():
    assert dashed_flags(["x", "--model-config=a", "--find-micro-batch", "--compare-plan",
                         "--config.train.grad_accum=2", "--no-compare-plan"]) == [
        "x", "--model_config=a", "--find_micro_batch", "--compare_plan",
        "--config.train.grad_accum=2", "--nocompare_plan"]


def test_the_fields_a_command_line_sets_are_never_refitted():
    assert config_fields(["compile_check", "--config", "c.py", "--config.train.grad_accum=2",
                          "--topology", "v5p-64", "--config.mesh.fsdp=4"]) == [
        "train.grad_accum", "mesh.fsdp"]


def test_a_child_repeats_the_run_but_not_the_outputs_or_searches():
    argv = ["compile_check", "--config", "c.py", "--config.train.grad_accum=2", "--out", "DIR",
            "--topology", "v5p-64", "--programs=a,b", "--find_micro_batch", "--nocompare_plan",
            "--model", "SDAR-8B", "--record_to=f"]
    assert child_command_line(argv) == ["--config", "c.py", "--config.train.grad_accum=2",
                                        "--topology", "v5p-64", "--model", "SDAR-8B"]


def test_report_arithmetic_on_a_cpu_compile():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    program = Program("dipo_apply", mesh, lambda: jax.jit(lambda a: a @ a + 1.0, donate_argnums=0).lower(x))
    record = compile_program(program, "cpu", CHIPS["v5e"])
    assert not record.error
    assert record.peak_bytes == (record.argument_bytes + record.output_bytes + record.temp_bytes
                                 + record.code_bytes - record.alias_bytes)
    assert record.flops >= 2 * 256 ** 3
    assert record.headroom == pytest.approx(1 - record.peak_bytes / (16 * GIB))
    assert record.predicted_seconds == pytest.approx(max(record.flops / 197e12,
                                                         record.bytes_accessed / 819e9))
    assert record.attention_impl == "none" and record.mosaic_calls == 0
    assert problems([record]) == []
    small = compile_program(program, "cpu", Chip("tiny", 1024, 1.0, 1.0, ""))
    (line,) = problems([small])
    assert line.startswith("dipo_apply needs ") and line.endswith("change mesh.fsdp, mesh.tensor")
    assert "GiB per chip but a cpu chip has 0 GiB of HBM" in line


def test_a_compile_error_is_a_record_naming_it():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))

    def broken():
        raise RuntimeError("INTERNAL: Mosaic failed\nmore lines")
    record = compile_program(Program("dipo_score", mesh, broken), "v5p:2x2x1", CHIPS["v5p"])
    assert record.error == "RuntimeError: INTERNAL: Mosaic failed" and not record.fits
    assert problems([record]) == [f"dipo_score does not compile for v5p:2x2x1: {record.error}"]

    def out_of_memory():
        raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory in "
                           "memory space HBM. Used 20.2G of 15.75G hbm. Exceeded hbm capacity by "
                           "4.5G. Total hbm usage >= 20.2G: the total memory required for HLO "
                           "temporaries (20.23G) exceeds available HBM (15.75G). HLO module: x.")
    record = compile_program(Program("dipo_score", mesh, out_of_memory), "v5e:2x4", CHIPS["v5e"])
    assert record.peak_bytes == int(20.2 * GIB)  # the compiler's count
    assert compiler_hbm_usage("the total memory required for HLO temporaries (84.70G) exceeds "
                              "available HBM (31.24G)") == int(84.70 * GIB)
    assert problems([record]) == [
        "dipo_score does not fit a v5e:2x4 chip (the total memory required for HLO temporaries "
        "(20.23G) exceeds available HBM (15.75G)); change train.canvas_rows, train.row_length, "
        "mesh.fsdp, mesh.tensor, train.logprob_chunk"]


@needs_tpu_compiler
def test_find_micro_batch_prints_the_largest_fitting_override(tmp_path):
    # 8 rows over data x fsdp = 4: 1 or 2 rows per chip; both fit a v5p chip, so the search
    # ends at the largest, grad_accum 1 (doubling 1 -> 2)
    result, report = compile_check([*SFT_TINY, "--config.train.global_batch=8",
                                    "--config.train.grad_accum=2", "--find-micro-batch"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert report["search"] == {"overrides": ["--config.train.grad_accum=1"],
                                "micro_rows_per_chip": 2, "grad_accum": 1}
    assert "largest that fits with 10 % headroom: --config.train.grad_accum=1" in result.stdout


def test_dipo_gradients_come_back_sharded_as_the_parameters():
    """On an fsdp mesh (8 CPU devices) the gradient program's outputs keep every parameter's
    sharding: XLA left alone returned them replicated (8B on v5p-64: 28.5 GiB per chip of
    gradients instead of 3.8)."""
    from dirl_jax.config import dipo_defaults
    from dirl_jax.mesh import make_mesh
    from dirl_jax.sizing import programs as programs_lib
    config = dipo_defaults()
    config.train.update(canvas_rows=8, row_length=64, logprob_chunk=64)
    config.model.attention_impl = "reference"
    mesh = make_mesh((1, 8, 1), jax.devices()[:8])
    graphdef, params = programs_lib.sharded_params(
        programs_lib.abstract_train_model(config, TINY), mesh)
    gradients = next(p for p in programs_lib.dipo_update_programs(config, TINY, mesh)
                     if p.name == "dipo_gradients")
    with jax.set_mesh(mesh):
        compiled = gradients.lower().compile()
    grads = compiled.output_shardings[0]
    sharded = [(g, p.sharding) for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))
               if not p.sharding.is_fully_replicated]
    assert len(sharded) >= 2 * TINY.num_hidden_layers  # the layers' matrices at least
    for got, want in sharded:
        assert got.is_equivalent_to(want, 2), (got, want)


@pytest.mark.parametrize("program", ["dipo_gradients"])  # (dipo_score's CPU compile hid the gather)
def test_dipo_memory_per_device_does_not_grow_with_the_devices(program):
    """One canvas row per device on 2 and on 8 devices (data parallel): each device holds the same
    bytes. Scoring a flat list of every row's tokens instead gathers all rows' hidden states onto
    every device (8B on v5p-64: 10.5 GiB per chip) and repeats the vocabulary projection there;
    the tiled kernel's row loop outside ``shard_map`` gathered every row's q, k and v."""
    from dirl_jax.config import dipo_defaults
    from dirl_jax.mesh import make_mesh
    from dirl_jax.sizing import programs as programs_lib
    temps = []
    for devices in (2, 8):
        config = dipo_defaults()
        config.train.update(canvas_rows=devices, row_length=512, logprob_chunk=64)
        config.model.attention_impl = "tiled"  # O(length) memory: the scored tokens dominate
        mesh = make_mesh((devices, 1, 1), jax.devices()[:devices])
        compiled_program = next(p for p in programs_lib.dipo_update_programs(config, TINY, mesh)
                                if p.name == program)
        with jax.set_mesh(mesh):
            temps.append(compiled_program.lower().compile().memory_analysis().temp_size_in_bytes)
    assert temps[1] <= 1.02 * temps[0], temps


@needs_tpu_compiler
def test_splash_sft_compiles_at_one_sample_per_chip(tmp_path):
    """One 2k-token sample per chip, head_dim 128: XLA:TPU aborted on the q/k projections fused
    with the norm and Splash's heads-major transpose until the model kept them apart on TPU."""
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(SDARConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, block_size=4,
        mask_token_id=4000).to_hf_dict()))
    result, report = compile_check(
        ["--config", "configs/sft_sdar8b.py", "--model-config", str(config), "--topology", "v5p-8",
         "--config.mesh.fsdp=4", "--config.train.grad_accum=128", "--config.data.max_length=2048"],
        tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    record = by_program(report)["sft_train_step"]
    assert record["attention_impl"] == "splash" and record["mosaic_calls"] >= 3
