"""Export for serving: HF names against the real 8B index, run / checkpoint / HF exports that
LMDeploy reads, the remote-code config class, and the server launch script (with a stand-in
``lmdeploy`` that parses its arguments with LMDeploy's own CLI parser)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

from conftest import REPO, free_port, random_model, tiny_config
from dirl_jax.trainers import sft as sft_trainer
from dirl_jax.checkpoint import restore_params
from dirl_jax.config import sft_defaults
from dirl_jax.model import SDARConfig, abstract_model, load_model, parameter_shapes
from torch_bridge import configuration_sdar, to_torch_state_dict
from torch_bridge.export import (AUTO_MAP, ExportError, add_config_class, export_for_serving, main,
                                 run_config, run_model_config)


# ------------------------------------------------------------------- names against the 8B
def real_index(shared_dir: pathlib.Path) -> dict[str, str]:
    path = shared_dir / "data" / "sdar_tokenizer" / "model.safetensors.index.json"
    return json.loads(path.read_text())["weight_map"]


def test_hf_names_and_shapes_match_the_real_8b_checkpoint(shared_dir):
    config = SDARConfig.from_pretrained(shared_dir / "data" / "sdar_tokenizer")
    shapes = parameter_shapes(abstract_model(config))
    assert set(shapes) == set(real_index(shared_dir))
    layer = "model.layers.35."
    expected = {  # HF layouts: Linear weights are [out, in]
        "model.embed_tokens.weight": (151936, 4096), "lm_head.weight": (151936, 4096),
        "model.norm.weight": (4096,), layer + "input_layernorm.weight": (4096,),
        layer + "self_attn.q_proj.weight": (32 * 128, 4096),
        layer + "self_attn.k_proj.weight": (8 * 128, 4096),
        layer + "self_attn.v_proj.weight": (8 * 128, 4096),
        layer + "self_attn.o_proj.weight": (4096, 32 * 128),
        layer + "self_attn.q_norm.weight": (128,), layer + "self_attn.k_norm.weight": (128,),
        layer + "mlp.gate_proj.weight": (12288, 4096), layer + "mlp.up_proj.weight": (12288, 4096),
        layer + "mlp.down_proj.weight": (4096, 12288),
        layer + "post_attention_layernorm.weight": (4096,)}
    assert {name: shapes[name] for name in expected} == expected


def name_scheme(names) -> set[str]:
    return {re.sub(r"^model\.layers\.\d+\.", "model.layers.{i}.", name) for name in names}


def test_torch_state_dict_follows_the_checkpoint_naming_scheme(shared_dir, seed):
    model = random_model(tiny_config(layers=2), seed)
    state = to_torch_state_dict(model, torch.float32)
    shapes = parameter_shapes(model)
    assert {name: tuple(t.shape) for name, t in state.items()} == shapes
    assert name_scheme(state) == name_scheme(real_index(shared_dir))


# ------------------------------------------------------------------------- the tiny run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A real 2-step SFT run (random init, builtin tokenizer): checkpoints 1 and 2, fp32 export."""
    config = sft_defaults()
    config.run_dir = str(tmp_path_factory.mktemp("runs") / "sft")
    config.tokenizer = "builtin:toy"
    config.data.update(max_length=96, builtin_train_size=64, builtin_eval_size=0)
    config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config.train.update(num_steps=2, global_batch=8, warmup_steps=0, schedule="constant")
    config.checkpoint.update(every_steps=1, keep=3)
    config.eval.num_examples = 0
    config.export.dtype = "float32"
    sft_trainer.run_sft(config)
    return pathlib.Path(config.run_dir)


def checkpoint_params(run: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """HF name -> fp32 parameter of checkpoint ``step``, restored independently of the export."""
    model_config = SDARConfig.from_pretrained(run / "export")
    abstract = nnx.state(abstract_model(model_config, dtype=jnp.float32), nnx.Param)
    params = restore_params(run / "checkpoints", step, abstract)
    return {".".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(params)}


def exported_params(out: pathlib.Path) -> dict[str, np.ndarray]:
    model, _ = load_model(out, jnp.float32)
    return {".".join(map(str, path)): np.asarray(jax.device_get(v.get_value()))
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_export_of_a_run_is_its_latest_checkpoint_and_loads_everywhere(run_dir, tmp_path):
    out = pathlib.Path(export_for_serving(run_dir, tmp_path / "served", dtype="float32"))
    for export in (out, run_dir / "export"):  # both carry the run's split
        record = json.loads((export / "dirl_training.json").read_text())
        assert (record["run_dir"], record["task"]) == (str(run_dir), "sft")
        assert record["data"]["split_seed"] == 0 and record["data"]["source"] == "builtin:arithmetic"
    assert_params_equal(exported_params(out), checkpoint_params(run_dir, 2))
    assert_params_equal(load_file(out / "model.safetensors"),
                        load_file(run_dir / "export" / "model.safetensors"))
    hf = json.loads((out / "config.json").read_text())
    assert hf["auto_map"] == AUTO_MAP and hf["architectures"] == ["SDARForCausalLM"]
    assert hf["model_type"] == "sdar" and hf["torch_dtype"] == hf["dtype"] == "float32"
    assert (out / "configuration_sdar.py").read_text() == \
        pathlib.Path(configuration_sdar.__file__).read_text()
    model_config = SDARConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # as LMDeploy loads it
    assert tokenizer.convert_tokens_to_ids("<|MASK|>") == model_config.mask_token_id
    hf_model, info = Qwen3ForCausalLM.from_pretrained(out, output_loading_info=True,
                                                      dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_config_class_reads(out, model_config)


def assert_config_class_reads(directory: pathlib.Path, expected: SDARConfig) -> None:
    """transformers (remote code) and LMDeploy's own config readers see the model's fields."""
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    assert type(config).__name__ == "SDARConfig" and config.model_type == "sdar"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "rope_theta", "max_position_embeddings", "tie_word_embeddings", "block_size",
                  "mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, field) == getattr(expected, field), field
    assert not config.use_sliding_window and not config.attention_bias
    pytest.importorskip("lmdeploy")
    from lmdeploy.archs import get_model_arch
    from lmdeploy.pytorch.configurations import AutoModelConfigBuilder
    from lmdeploy.pytorch.models.module_map import MODULE_MAP
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params, get_rope_theta
    arch, hf_config = get_model_arch(str(directory), trust_remote_code=True)
    assert MODULE_MAP[arch].endswith("sdar.SDARForCausalLM")
    built = AutoModelConfigBuilder.build(hf_config, str(directory))
    assert (built.model_paradigm, built.head_dim, built.num_key_value_heads, built.sliding_window,
            built.vocab_size) == ("dllm", expected.head_dim, expected.num_key_value_heads, -1,
                                  expected.vocab_size)
    assert get_rope_theta(hf_config) == expected.rope_theta
    assert build_rotary_params(hf_config)["emb_type"].name == "Default"


def test_config_class_reads_the_real_8b_config(shared_dir, tmp_path):
    shutil.copy(shared_dir / "data" / "sdar_tokenizer" / "config.json", tmp_path)
    add_config_class(str(tmp_path), "bfloat16")
    assert_config_class_reads(tmp_path, SDARConfig.from_pretrained(shared_dir / "data" / "sdar_tokenizer"))


def test_export_of_a_checkpoint_step(run_dir, tmp_path):
    from_dir = export_for_serving(run_dir / "checkpoints" / "1", tmp_path / "a", dtype="float32")
    assert_params_equal(exported_params(pathlib.Path(from_dir)), checkpoint_params(run_dir, 1))
    assert main(["--checkpoint", str(run_dir), "--step", "1", "--out", str(tmp_path / "b"),
                 "--dtype", "float32"]) == 0
    assert_params_equal(load_file(tmp_path / "a" / "model.safetensors"),
                        load_file(tmp_path / "b" / "model.safetensors"))
    step2 = checkpoint_params(run_dir, 2)
    assert any(not np.array_equal(v, step2[k]) for k, v in checkpoint_params(run_dir, 1).items())


def copy_run(run_dir: pathlib.Path, target: pathlib.Path, without: str) -> pathlib.Path:
    shutil.copytree(run_dir, target, ignore=lambda d, names: [without] if d == str(run_dir) else [])
    return target


def test_architecture_and_tokenizer_from_the_run_config_before_export(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run", without="export")
    assert run_model_config(str(run), run_config(str(run))) == SDARConfig.from_pretrained(run_dir / "export")
    out = export_for_serving(run, tmp_path / "served", dtype="float32")
    assert_params_equal(load_file(pathlib.Path(out) / "model.safetensors"),
                        load_file(run_dir / "export" / "model.safetensors"))
    assert (pathlib.Path(out) / "tokenizer_config.json").is_file()


def test_run_without_checkpoints_exports_its_export_dir(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run", without="checkpoints")
    out = export_for_serving(run, tmp_path / "served", dtype="float32")
    assert_params_equal(load_file(pathlib.Path(out) / "model.safetensors"),
                        load_file(run_dir / "export" / "model.safetensors"))
    with pytest.raises(ExportError, match=r"no committed checkpoint for step 1 \(committed steps: none\)"):
        export_for_serving(run, tmp_path / "other", step=1)


def test_export_of_a_hf_directory_in_bfloat16(run_dir, tmp_path):
    out = pathlib.Path(export_for_serving(run_dir / "export", tmp_path / "served"))
    exported = load_file(out / "model.safetensors")
    for name, value in load_file(run_dir / "export" / "model.safetensors").items():
        assert exported[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[name], value.astype(ml_dtypes.bfloat16), err_msg=name)
    hf = json.loads((out / "config.json").read_text())
    assert hf["torch_dtype"] == hf["dtype"] == "bfloat16" and hf["auto_map"] == AUTO_MAP
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).block_size == 4


def test_refuses_to_overwrite_without_the_flag(run_dir, tmp_path, capsys):
    out = tmp_path / "served"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(f"{out}: already exists (pass --overwrite")):
        export_for_serving(run_dir, out)
    with pytest.raises(SystemExit) as done:
        main(["--checkpoint", str(run_dir), "--out", str(out)])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"error: {out}: already exists (pass --overwrite to replace it)\n"
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    # --overwrite replaces only a previous export: a folder of other files stays as it is
    with pytest.raises(FileExistsError, match=re.escape(f"{out}: exists and is not a model directory "
                                                        "written by dirl-jax (no .dirl_export)")):
        export_for_serving(run_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    fresh = tmp_path / "fresh"
    export_for_serving(run_dir, fresh)
    (fresh / "model.safetensors").write_bytes(b"stale")
    export_for_serving(run_dir, fresh, overwrite=True)
    assert (fresh / ".dirl_export").is_file() and (fresh / "model.safetensors").stat().st_size > 5
    modes = {p.name: p.stat().st_mode & 0o777 for p in fresh.iterdir()}
    assert set(modes.values()) == {0o644} and fresh.stat().st_mode & 0o777 == 0o755, modes


def test_never_overwrites_the_source(run_dir, tmp_path):
    for out in (run_dir, run_dir.parent):
        with pytest.raises(ExportError, match=re.escape(f"--out {out}: is or contains the source")):
            export_for_serving(run_dir, out, overwrite=True)
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoints").is_dir()


@pytest.mark.parametrize("source,kwargs,error,message", [
    ("{tmp}/missing", {}, FileNotFoundError, r"missing: does not exist \(expected a training run"),
    ("{run}/metrics.jsonl", {}, ExportError, r"metrics.jsonl: is a file"),
    ("{run}/tokenizer", {}, ExportError, r"tokenizer: not a training run directory"),
    ("{run}", {"step": 7}, ExportError,
     r"checkpoints: no committed checkpoint for step 7 \(committed steps: 1, 2\)"),
    ("{run}/checkpoints/1", {"step": 2}, ExportError,
     r"checkpoints/1: is the checkpoint of step 1, but --step 2"),
    ("{run}/export", {"step": 1}, ExportError, r"export: is a HF model directory"),
    ("{run}/export", {"tokenizer": "{run}/checkpoints"}, ExportError,
     r"checkpoints: no tokenizer_config.json \(expected a tokenizer directory"),
])
def test_bad_sources_name_the_path_and_what_was_expected(run_dir, tmp_path, source, kwargs, error,
                                                          message):
    def fill(value):
        return value.format(tmp=tmp_path, run=run_dir) if isinstance(value, str) else value

    with pytest.raises(error, match=message):
        export_for_serving(fill(source), tmp_path / "served",
                           **{k: fill(v) for k, v in kwargs.items()})
    assert not (tmp_path / "served").exists()


WITHOUT_LMDEPLOY = """
import runpy, sys
sys.modules["lmdeploy"] = None  # any `import lmdeploy...` now raises ImportError
import torch_bridge, torch_bridge.configuration_sdar
runpy.run_module("torch_bridge.export", run_name="__main__")
"""


def test_export_needs_no_lmdeploy(run_dir, tmp_path, monkeypatch):
    """A TPU user exporting for someone else's servers installs no LMDeploy: the export command
    runs with LMDeploy unimportable; pushing weights says how to install it."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_LMDEPLOY, "--checkpoint", str(run_dir),
                             "--out", str(tmp_path / "served")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "served" / "configuration_sdar.py").is_file()
    from torch_bridge import weight_push
    monkeypatch.setitem(sys.modules, "lmdeploy", None)
    monkeypatch.delitem(sys.modules, "lmdeploy.utils", raising=False)
    with pytest.raises(ImportError, match="pushing weights to LMDeploy servers needs LMDeploy"):
        weight_push.lmdeploy_utils()


def test_cli_module_reports_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch_bridge.export", "--checkpoint",
                             str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'nope'}: does not exist")
    assert len(result.stderr.splitlines()) == 1


# ------------------------------------------------------------------------ launch script
FAKE_LMDEPLOY = """#!{python}
# Stand-in for `lmdeploy`: parses argv with LMDeploy's real CLI parser, records it, serves /v1/models.
import http.server, json, sys
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.serve import SubCliServe
CLI.add_parsers()
SubCliServe.add_parsers()
args = CLI.parser.parse_args(sys.argv[1:])
record = {{k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}}
json.dump(record, open({record!r}, "w"))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # like LMDeploy with --api-keys: /v1 needs the bearer
        authorized = not args.api_keys or self.headers.get("Authorization") == "Bearer " + args.api_keys[0]
        self.send_response(401 if not authorized else 200 if self.path == "/v1/models" else 404)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", args.server_port), Handler).serve_forever()
"""


def test_launch_script_passes_the_dllm_flags_lmdeploy_parses(run_dir, tmp_path):
    pytest.importorskip("lmdeploy")
    script = REPO / "scripts" / "launch_lmdeploy.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("curl") is None:
        pytest.skip("curl is needed by the launch script's health check")
    model = export_for_serving(run_dir, tmp_path / "served")
    fake = tmp_path / "lmdeploy"
    fake.write_text(FAKE_LMDEPLOY.format(python=sys.executable, record=str(tmp_path / "args.json")))
    fake.chmod(0o755)
    port = free_port()
    env = {**os.environ, "LMDEPLOY_BIN": str(fake), "PYTHON": sys.executable,
           "LMDEPLOY_LOG": str(tmp_path / "server.log"), "DLLM_UNMASKING_STRATEGY": "low_confidence_static",
           "STARTUP_TIMEOUT": "60", "DIRL_API_KEY": "launch-test-key"}
    result = subprocess.run([str(script), model, str(port), "--session-len", "4096"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + (tmp_path / "server.log").read_text()
    lines = dict(line.split("=", 1) for line in result.stdout.split())
    os.kill(int(lines["PID"]), signal.SIGTERM)  # the stand-in server this test started
    assert lines["URL"] == f"http://127.0.0.1:{port}"
    assert "launch-test-key" not in result.stderr  # the printed command line hides the key
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["api_keys"] == ["launch-test-key"] and args["server_name"] == "127.0.0.1"
    assert {k: args[k] for k in ("model_path", "backend", "trust_remote_code", "server_port",
                                 "distributed_executor_backend", "dllm_block_length",
                                 "dllm_unmasking_strategy", "dllm_denoising_steps",
                                 "dllm_confidence_threshold", "dtype", "session_len")} == {
        "model_path": model, "backend": "pytorch", "trust_remote_code": True, "server_port": port,
        "distributed_executor_backend": "ray", "dllm_block_length": 4,
        "dllm_unmasking_strategy": "low_confidence_static", "dllm_denoising_steps": 4,
        "dllm_confidence_threshold": 0.9, "dtype": "bfloat16", "session_len": 4096}


def test_lmdeploy_still_needs_the_exported_config_class(run_dir, tmp_path):
    """Why the launch script passes --trust-remote-code: without the exported SDARConfig class,
    LMDeploy falls back to a generic config whose ``rope_parameters`` is None, and building the
    rotary embedding fails. When this test fails, the flag can go."""
    pytest.importorskip("lmdeploy")
    from lmdeploy.hf_configs import config_from_pretrained
    from lmdeploy.pytorch.nn.rotary_embedding import get_rope_theta
    model = export_for_serving(run_dir, tmp_path / "served")
    theta = json.loads((pathlib.Path(model) / "config.json").read_text())["rope_theta"]
    assert get_rope_theta(config_from_pretrained(model, trust_remote_code=True)) == theta
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'get'"):
        get_rope_theta(config_from_pretrained(model, trust_remote_code=False))


def test_launch_script_refuses_to_serve_without_a_key(run_dir, tmp_path):
    model = export_for_serving(run_dir, tmp_path / "served")
    env = {k: v for k, v in os.environ.items() if k not in ("DIRL_API_KEY", "LMDEPLOY_API_KEY")}
    env.update(LMDEPLOY_BIN="true", PYTHON=sys.executable, HOST="0.0.0.0")
    result = subprocess.run([str(REPO / "scripts" / "launch_lmdeploy.sh"), model], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error: no API key: set DIRL_API_KEY (or LMDEPLOY_API_KEY)" in result.stderr
    env.update(INSECURE="1", DLLM_BLOCK_LENGTH="8")  # past the key check: the next check stops it
    result = subprocess.run([str(REPO / "scripts" / "launch_lmdeploy.sh"), model], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "DLLM_BLOCK_LENGTH=8 differs" in result.stderr


def test_launch_script_rejects_a_block_length_other_than_the_models(run_dir, tmp_path):
    model = export_for_serving(run_dir, tmp_path / "served")
    env = {**os.environ, "DLLM_BLOCK_LENGTH": "8", "LMDEPLOY_BIN": "true", "PYTHON": sys.executable,
           "DIRL_API_KEY": "k"}
    result = subprocess.run([str(REPO / "scripts" / "launch_lmdeploy.sh"), model], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"DLLM_BLOCK_LENGTH=8 differs from block_size=4 in {model}/config.json" in result.stderr
