"""The command lines as a user meets them: one-line errors with exit status 2 (tracebacks only on
request), ``--help`` listing the config, one meaning for a model path, and ``generate``'s chat
template, validation and step display."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import dirl_jax
from conftest import REPO, random_model, tiny_config
from dirl_jax.data import toy
from dirl_jax.model import ModelPathError, resolve_model_dir

BLOCK = 4

def load_generate_cli():
    """The ``dirl_jax.generate`` module, loaded without rebinding the package's ``generate``
    (the function) to it."""
    spec = importlib.util.find_spec("dirl_jax.generate")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_cli = load_generate_cli()


def run_module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, **env})


# ----------------------------------------------------------------------------- --config commands
def test_help_lists_the_given_configs_fields_and_exits_0():
    done = run_module("dirl_jax.train", "--config", "configs/sft_tiny.py", "--help")
    assert done.returncode == 0, done.stderr
    assert "config fields (configs/sft_tiny.py):" in done.stdout
    assert "  config.train.num_steps = 2000\n" in done.stdout  # the file's value, not the default
    assert "  config.run_dir = 'runs/sft_tiny'\n" in done.stdout


def test_help_without_config_lists_the_defaults():
    done = run_module("dirl_jax.evaluate", "--help")
    assert done.returncode == 0, done.stderr
    assert "config fields (the defaults" in done.stdout and "  config.benchmarks = " in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nofile.py"], "error: --config configs/nofile.py: no such file\n"),
    (["--config", "configs/sft_tiny.py", "stray"],
     "error: unexpected arguments: stray (fields are set as --config.a.b=value)\n"),
    (["--config", "configs/sft_tiny.py", "--config.nope.x=1"],
     "error: --config.nope.x: the config has no field 'nope'\n"),
])
def test_config_errors_are_one_line_with_status_2(args, message):
    done = run_module("dirl_jax.train", *args)
    assert (done.returncode, done.stderr, done.stdout) == (2, message, "")


@pytest.mark.parametrize("how", [{"args": ["--verbose"]}, {"env": {"DIRL_DEBUG": "1"}}])
def test_verbose_or_dirl_debug_shows_the_traceback(tmp_path, how):
    done = run_module("dirl_jax.train", "--config", "configs/sft_tiny.py",
                      f"--config.run_dir={tmp_path}", "--config.train.learning_rate=-1",
                      *how.get("args", []), **how.get("env", {}))
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "ConfigValueError: config.train.learning_rate: must be > 0, got -1" in done.stderr


# ----------------------------------------------------------------------------- model paths
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run directory (config.json with a task) whose export is a tiny random model
    with the toy tokenizer (max 64 positions)."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = toy.toy_tokenizer()
    tokenizer.save_pretrained(run / "tok")
    config = dataclasses.replace(tiny_config(block_size=BLOCK, vocab=len(tokenizer)),
                                 mask_token_id=tokenizer.mask_token_id,
                                 pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64,
                                 eos_token_id=tokenizer.convert_tokens_to_ids(toy.IM_END))
    dirl_jax.save_model(random_model(config, 0), config, run / "export", tokenizer_dir=run / "tok",
                        dtype="float32")
    (run / "config.json").write_text(json.dumps({"task": "sft"}))
    return run


def test_a_run_directory_means_its_export(run_dir):
    assert resolve_model_dir(run_dir) == str(run_dir / "export")
    assert resolve_model_dir(run_dir / "export") == str(run_dir / "export")


def test_a_run_without_an_export_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"task": "dipo"}))
    with pytest.raises(ModelPathError, match=f"{tmp_path}: a training run without an export yet"):
        resolve_model_dir(tmp_path)


@pytest.mark.parametrize("path", ["tests/no_such_run", "./nope", "a/b/c", "/definitely/not/here"])
def test_a_missing_local_path_is_never_a_hub_id(path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub"))
    with pytest.raises(ModelPathError, match=f"{path}: no such directory"):
        resolve_model_dir(path)


def test_a_hub_id_that_cannot_be_fetched_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nCheck your connection")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelPathError, match="^nobody/no-model: no such local directory, and the "
                       "Hugging Face hub cannot provide it \\(OSError: We couldn't connect to "
                       "'https://huggingface.co' Check your connection\\)$"):
        resolve_model_dir("nobody/no-model")


# ----------------------------------------------------------------------------- generate
def test_generate_answers_a_run_directory_through_its_chat_template(run_dir):
    """End to end in a subprocess: the prompt through the exported tokenizer's chat template,
    the response without special tokens, ``--show-steps`` one line per generated token."""
    done = run_module("dirl_jax.generate", "--model", str(run_dir), "--prompt", "What is 7 plus 5?",
                      "--max-new-tokens", "8", "--show-steps")
    assert done.returncode == 0, done.stderr
    tokenizer = toy.toy_tokenizer()
    model, _ = dirl_jax.load_model(run_dir, "float32")
    prompt = tokenizer.encode("<|im_start|>user\nWhat is 7 plus 5?<|im_end|>\n<|im_start|>assistant\n")
    [expected] = dirl_jax.generate(model, [prompt], temperature=0.0, max_new_tokens=8,
                                   stop_ids=[tokenizer.convert_tokens_to_ids(toy.IM_END),
                                             tokenizer.pad_token_id])
    response = tokenizer.decode(expected["token_ids"], skip_special_tokens=True)
    assert done.stdout.startswith(response + "\n\n step  token\n")
    steps = done.stdout.split(" step  token\n")[1].strip().splitlines()[:-1]
    assert [int(line.split()[0]) for line in steps if line.strip()] == list(expected["step_map"])


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "threshold: must be in [0, 1], got 1.5"),
    (["--steps", "5"], "steps: must be in [1, block_size = 4], got 5"),
    (["--max-new-tokens", "29"], "prompts[0]: 36 prompt tokens + max_new_tokens 29 reach position "
                                 "68 (the end of that block), beyond the model's "
                                 "max_position_embeddings 64"),
    (["--template", "rollout"], "prompts[0]: 109 prompt tokens + max_new_tokens 8 reach position 120"),
])
def test_generate_refuses_what_the_model_cannot_do(run_dir, capsys, args, message):
    argv = ["--model", str(run_dir), "--prompt", "What is 7 plus 5?", "--max-new-tokens", "8", *args]
    with pytest.raises(SystemExit) as done:
        generate_cli.main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_generate_up_to_the_last_position_runs(run_dir, capsys):
    generate_cli.main(["--model", str(run_dir), "--prompt", "What is 7 plus 5?",
                       "--max-new-tokens", "28", "--template", "chat"])  # 36 + 28 = 64 positions
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[")


def test_generate_names_a_missing_model_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        generate_cli.main(["--model", str(tmp_path / "sft_tny"), "--prompt", "hi"])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'sft_tny'}: no such directory: not a model " \
        "directory (expected a HF model directory, a training run directory or a hub id 'org/name')\n"


def test_library_generate_checks_block_size_and_vocabulary(run_dir):
    model, config = dirl_jax.load_model(run_dir, "float32")
    with pytest.raises(ValueError, match="block_size: the model decodes blocks of 4 tokens .* got 8"):
        dirl_jax.generate(model, [[5, 6]], block_size=8, max_new_tokens=4)
    with pytest.raises(ValueError, match=f"prompts\\[1\\]: token id {config.vocab_size} is outside "
                                         f"the model's vocabulary \\[0, {config.vocab_size}\\)"):
        dirl_jax.generate(model, [[5, 6], [5, config.vocab_size]], max_new_tokens=4)
    [ok] = dirl_jax.generate(model, [[5, 6]], block_size=BLOCK, max_new_tokens=4)
    assert len(ok["token_ids"]) <= 4 + BLOCK - 1  # the whole final block
