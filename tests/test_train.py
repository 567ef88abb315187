"""The SFT trainer: exact gradient accumulation, bit-exact resume, config validation, bad inputs."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import REPO
from dirl_jax import mesh as mesh_lib
from dirl_jax import run as run_lib
from dirl_jax.trainers import sft as sft_trainer
from dirl_jax.trainers.steps import make_train_step
from dirl_jax.config import ConfigValueError, check_model_block_size, sft_defaults
from dirl_jax.run import validate_sft as validate
from dirl_jax.data import sft as sft_data
from dirl_jax.data.records import DataError, read_records
from dirl_jax.data import toy
from dirl_jax.model import SDARConfig, abstract_model
from dirl_jax.optim import make_optimizer


def tiny_run_config(run_dir, **train_overrides):
    config = sft_defaults()
    config.run_dir = str(run_dir)
    config.tokenizer = "builtin:toy"
    config.data.update(max_length=96, builtin_train_size=300, builtin_eval_size=8)
    config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config.train.update(num_steps=6, global_batch=8, learning_rate=3e-3, warmup_steps=2,
                        schedule="constant", log_every=2)
    config.train.update(**train_overrides)
    config.checkpoint.every_steps = 3
    config.eval.update(num_examples=4, max_new_tokens=8, batch_size=4)
    config.export.dtype = "float32"
    return config


def test_sft_logs_the_rate_each_update_applies(tmp_path, seed):
    """Logged rates follow the optimizer's own counter (half the peak, then the peak, with two
    warmup updates), and the first is the step Adam takes: max |change| of any weight."""
    tokenizer = toy.toy_tokenizer()
    config = tiny_run_config(tmp_path, weight_decay=0.0)  # lr 3e-3, 2 warmup updates, constant
    records, _ = run_lib.sft_records(config)
    examples, _ = sft_data.prepare_examples(records, tokenizer, block_size=4, max_length=96,
                                            overlong="drop")
    batch = next(iter(sft_data.packed_batches(examples, seq_len=96, rows=8, seed=seed, pad_id=0)))
    model_config = run_lib.build_model_config(config, tokenizer)
    model = run_lib.build_model(config, model_config, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.train)
    step = make_train_step(graphdef, tx, config, model_config)
    shaped = {k: jnp.asarray(v).reshape(1, 8, -1) for k, v in batch.items()}
    opt_state, logged = tx.init(params), []
    for k in range(3):
        before = jax.device_get(params)
        params, opt_state, metrics = step(params, opt_state, shaped, jax.random.key(seed + k))
        logged.append(float(metrics["lr"]))
        if k == 0:
            moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                                                                     jax.tree.leaves(before)))
            assert moved == pytest.approx(logged[0], rel=1e-3)
    np.testing.assert_allclose(logged, [1.5e-3, 3e-3, 3e-3], rtol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, seed):
    tokenizer = toy.toy_tokenizer()
    config = tiny_run_config(tmp_path)
    records, _ = run_lib.sft_records(config)
    examples, _ = sft_data.prepare_examples(records, tokenizer, block_size=4, max_length=96,
                                            overlong="drop")
    batch = next(iter(sft_data.packed_batches(examples, seq_len=96, rows=8, seed=seed, pad_id=0)))
    # adam_eps=1 makes the update smooth in the gradient (plain Adam turns fp-noise-sized gradients
    # into full steps of either sign), so comparing updates compares the accumulated gradients.
    config.train.adam_eps = 1.0
    results = []
    for accum in (1, 4):
        config.train.update(global_batch=8, grad_accum=accum)
        model_config = run_lib.build_model_config(config, tokenizer)
        model = run_lib.build_model(config, model_config, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
        graphdef, params = nnx.split(model, nnx.Param)
        tx = make_optimizer(config.train)
        step = make_train_step(graphdef, tx, config, model_config)
        shaped = {k: jnp.asarray(v).reshape(accum, 8 // accum, -1) for k, v in batch.items()}
        new_params, _, metrics = step(params, tx.init(params), shaped, jax.random.key(seed))
        results.append((jax.device_get(new_params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_exact(tmp_path):
    straight = tiny_run_config(tmp_path / "straight")
    sft_trainer.run_sft(straight)
    resumed = tiny_run_config(tmp_path / "resumed")
    resumed.train.num_steps = 3
    sft_trainer.run_sft(resumed)
    resumed.train.num_steps = 6
    sft_trainer.run_sft(resumed)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    pa = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    pb = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    for row in a:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= row.keys()
    result = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_examples"] == 4
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["train"]["num_steps"] == 6
    assert (tmp_path / "straight" / "tensorboard").is_dir()


def test_interrupted_save_and_init_from_export(tmp_path):
    config = tiny_run_config(tmp_path / "run", num_steps=3)
    sft_trainer.run_sft(config)
    # A save that crashed half-way leaves an uncommitted temporary directory: it is ignored.
    junk = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "partial").write_text("x")
    config.train.num_steps = 4
    sft_trainer.run_sft(config)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    # A new run initialised from the exported HF directory, with bf16 compute over fp32 weights.
    follow = tiny_run_config(tmp_path / "follow", num_steps=1, compute_dtype="bfloat16")
    follow.init_from = str(tmp_path / "run" / "export")
    follow.tokenizer = ""
    sft_trainer.run_sft(follow)
    assert np.isfinite(read_metrics(tmp_path / "follow")[0]["loss"])


# ------------------------------------------------------------------------- bad inputs
def write_lines(path: pathlib.Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                {"role": "assistant", "content": "\\boxed{2}"}]})


@pytest.mark.parametrize("lines,error,message", [
    (None, FileNotFoundError, "dataset file not found"),
    ([GOOD, "{oops", GOOD], DataError, r"data\.jsonl:2: malformed JSON line"),
    ([GOOD, '{"mess\udcffages": 1}', GOOD], DataError,
     r"data\.jsonl:2: not UTF-8 text \(byte 0xff at column 7\); expected UTF-8 JSON"),
    ([json.dumps({"messages": [{"role": "robot", "content": "hi"}]})], DataError,
     r"record 0: messages\[0\] has unknown role 'robot'"),
    ([json.dumps({"messages": [{"role": "user", "content": "x" * 200},
                               {"role": "assistant", "content": "y"}]})],
     DataError, "no examples left after filtering .*1 longer than data.max_length=96 dropped"),
])
def test_bad_inputs_fail_before_the_run_directory_is_made(tmp_path, lines, error, message):
    source = tmp_path / "data.jsonl"
    if lines is not None:
        source.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    config = tiny_run_config(tmp_path / "run")
    config.data.source = str(source)
    with pytest.raises(error, match=message):
        sft_trainer.run_sft(config)
    assert not (tmp_path / "run").exists()


def test_truncate_keeps_overlong_examples():
    tokenizer = toy.toy_tokenizer()
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}]}
    examples, stats = sft_data.prepare_examples([record], tokenizer, block_size=4, max_length=64,
                                                overlong="truncate")
    assert stats.truncated == 1 and len(examples[0]["tokens"]) == 64
    assert stats.dropped == 0


def test_a_truncation_that_leaves_nothing_supervised_is_counted_and_reported(caplog):
    tokenizer = toy.toy_tokenizer()
    long_question = {"messages": [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a"}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with caplog.at_level("WARNING"):
        examples, stats = sft_data.prepare_examples([long_question, short], tokenizer, block_size=4,
                                                    max_length=64, overlong="truncate", source="d.jsonl")
    assert (stats.total, stats.truncated, stats.unsupervised, len(examples)) == (2, 1, 1, 1)
    assert ("d.jsonl: of 2 records, 0 longer than data.max_length=64 were dropped and 1 truncated; "
            "1 without a supervised token (left) were discarded") in caplog.text


def test_record_encoding_labels_and_block_padding():
    tokenizer = toy.toy_tokenizer()
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "ab"}]}
    tokens, labels = sft_data.encode_record(record, tokenizer, block_size=4)
    text = tokenizer.decode(tokens)
    prompt = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert text.startswith(prompt + "ab<|im_end|>\n")
    assert len(tokens) % 4 == 0
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert (labels[:n_prompt] == sft_data.IGNORE).all()
    supervised = labels[n_prompt:]
    assert (supervised == tokens[n_prompt:]).all()  # response, <|im_end|>\n and block padding
    assert tokenizer.decode(tokens[n_prompt:]).rstrip(toy.PAD).endswith("ab<|im_end|>\n")


def test_packed_rows_have_segments_positions_and_padding():
    tokenizer = toy.toy_tokenizer()
    records, _ = toy.builtin_split(0, 50, 0, 49)
    examples, _ = sft_data.prepare_examples(records, tokenizer, block_size=4, max_length=128,
                                            overlong="drop")
    batch = next(iter(sft_data.packed_batches(examples, seq_len=128, rows=4, seed=0, pad_id=0)))
    for row in range(4):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        assert (seg[seg >= 0] == np.sort(seg[seg >= 0])).all()
        for s in np.unique(seg[seg >= 0]):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        assert (batch["labels"][row][seg < 0] == sft_data.IGNORE).all()


# ------------------------------------------------------------------------- configs
@pytest.mark.parametrize("field,value,message", [
    ("train.global_batch", 6, r"train.global_batch: \(6\) must be divisible by train.grad_accum \(4\)"),
    ("model.block_size", 8, r"model.block_size: \(8\) must equal diffusion.block_size \(4\)"),
    ("train.schedule", "linear", "train.schedule: must be one of"),
    ("data.overlong", "keep", "data.overlong"),
    ("train.global_batch", 0, r"train.global_batch: must be positive, got 0"),
    ("diffusion.block_size", 0, r"diffusion.block_size: must be positive, got 0"),
    ("diffusion.eps", 1.0, r"diffusion.eps: must be in \(0, 1\), got 1.0"),
    ("data.max_length", 0, r"data.max_length: must be positive, got 0"),
    ("train.learning_rate", 0.0, r"train.learning_rate: must be > 0, got 0.0"),
    ("train.learning_rate", -1e-3, r"train.learning_rate: must be > 0, got -0.001"),
    ("train.adam_eps", 0.0, r"train.adam_eps: must be > 0"),
    ("train.max_grad_norm", -1.0, r"train.max_grad_norm: must be > 0"),
    ("train.weight_decay", -0.1, r"train.weight_decay: must be >= 0"),
    ("train.b2", 1.0, r"train.b2: must be in \[0, 1\), got 1.0"),
    ("train.min_lr_ratio", 1.5, r"train.min_lr_ratio: must be in \[0, 1\]"),
    ("train.log_every", 0, r"train.log_every: must be > 0"),
    ("train.warmup_steps", -1, r"train.warmup_steps: must be >= 0"),
])
def test_inconsistent_configs_are_rejected(tmp_path, field, value, message):
    config = tiny_run_config(tmp_path)
    config.train.grad_accum = 4
    config.train.global_batch = 8
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigValueError, match=message):
        validate(config)


def test_cli_reports_a_bad_value_in_one_line(tmp_path):
    done = run_cli("--config", "configs/sft_tiny.py", f"--config.run_dir={tmp_path / 'run'}",
                   "--config.train.learning_rate=-0.001")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: config.train.learning_rate: must be > 0, got -0.001\n"
    assert not (tmp_path / "run").exists()


def test_range_edges_that_are_valid_pass(tmp_path):
    config = tiny_run_config(tmp_path)
    config.train.update(b1=0.0, weight_decay=0.0, min_lr_ratio=1.0, warmup_steps=0)
    validate(config)
    config.train.min_lr_ratio = 0.0
    validate(config)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dirl_jax.train", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_cli_rejects_unknown_and_mistyped_overrides_in_one_line():
    unknown = run_cli("--config", "configs/sft_tiny.py", "--config.train.num_step=3")
    assert (unknown.returncode, unknown.stderr) == (2, (
        "error: --config.train.num_step: the config has no field 'num_step' "
        "(did you mean 'num_steps'?)\n"))
    mistyped = run_cli("--config", "configs/sft_tiny.py", "--config.train.num_steps=many")
    assert (mistyped.returncode, mistyped.stderr) == (2, (
        "error: flag --config.train.num_steps=many: invalid literal for int() with base 10: 'many'\n"))


def load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_paper_recipe_validates_and_builds_abstractly(shared_dir):
    config = load_config_file("sft_sdar8b")
    validate(config)
    assert (config.train.learning_rate, config.train.weight_decay, config.train.global_batch,
            config.train.num_steps, config.diffusion.block_size, config.data.max_length,
            config.train.schedule) == (1e-5, 0.0, 512, 100, 4, 8192, "cosine")
    model_config = SDARConfig.from_pretrained(shared_dir / "data" / "sdar_tokenizer")
    model = abstract_model(model_config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    params = nnx.state(model, nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert 8.1e9 < n_params < 8.3e9
    check_model_block_size(config, model_config.block_size)
    for devices, accum in ((8, 32), (64, 4)):  # one 8-GPU node; a v5p-128 slice (docs/SCALING.md)
        shape = mesh_lib.mesh_shape(config.mesh, devices)
        mesh_lib.check_mesh_fits(shape, model_config, config.train.global_batch // accum)


def test_embedded_default_config_validates():
    validate(load_config_file("sft_tiny"))


def test_cli_contract_runs_resumes_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", "configs/sft_tiny.py", f"--config.run_dir={run_dir}", "--config.seed=3",
              "--config.checkpoint.every_steps=2", "--config.eval.num_examples=4",
              "--config.eval.max_new_tokens=8", "--config.train.log_every=1",
              "--config.data.builtin_train_size=200", "--config.data.builtin_eval_size=6",
              "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32",
              "--config.model.intermediate_size=64"]
    first = run_cli(*common, "--config.train.num_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 2/2 | loss" in first.stdout and "tok/s" in first.stdout and "eta" in first.stdout
    second = run_cli(*common, "--config.train.num_steps=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["num_examples"] == 4 and isinstance(result["accuracy"], float)
    low, high = result["accuracy_ci95"]
    assert 0 <= low <= result["accuracy"] <= high <= 1 and len(result["correct"]) == 4
    # the evaluated set, exactly: the first 4 held-out problems of the split
    data = json.loads((run_dir / "config.json").read_text())["data"]
    _, heldout = toy.builtin_split(data["split_seed"], 0, data["builtin_eval_size"],
                                   data["builtin_max_operand"])
    heldout = heldout[:4]  # eval.num_examples of the 6 held out
    assert [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines()] == \
        [{"question": r["question"], "answer": r["answer"]} for r in heldout]
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "export" / "tokenizer_config.json").is_file()
    plot = subprocess.run([sys.executable, "scripts/plot_metrics.py", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert (run_dir / "metrics.png").stat().st_size > 0


def test_parquet_and_datasets_directory_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    import pyarrow.parquet as pq
    records, _ = toy.builtin_split(1, 5, 0, 49)
    messages = [r["messages"] for r in records]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "sft.parquet")
    from_parquet = read_records(str(tmp_path / "sft.parquet"))
    assert [r["messages"] for r in from_parquet] == messages
    (tmp_path / "hf").mkdir()
    write_lines(tmp_path / "hf" / "train.jsonl", [json.dumps({"messages": m}) for m in messages])
    from_datasets = read_records(str(tmp_path / "hf"), split="train")
    assert [r["messages"] for r in from_datasets] == messages


def test_sft_step_loss_is_normalised_by_supervised_not_masked_tokens(seed):
    """DIRL_SPEC §1.5: the loss of an SFT step is Σ_masked CE/p ÷ N_sup, N_sup counting every
    labelled token, masked or not. Recomputed in float64 from the logits of a dense-mask forward
    of DiRL's [noisy | clean] layout (§1.4, mask built here), with the step's noise."""
    import functools

    from conftest import random_model, tiny_config
    from dirl_jax import diffusion
    from dirl_jax.diffusion import IGNORE
    block, accum, micro, length = 4, 2, 2, 16
    rows = accum * micro
    model_config = tiny_config(block_size=block, layers=1)
    model = random_model(model_config, seed)
    config = sft_defaults()
    config.diffusion.update(block_size=block, loss_chunk=8)
    config.train.update(global_batch=rows, grad_accum=accum)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model_config.vocab_size - 1, (rows, length))  # never the mask id
    labels = np.full((rows, length), IGNORE)
    positions = np.zeros((rows, length), np.int64)
    segment_ids = np.full((rows, length), -1)
    for r in range(rows):  # block-aligned samples (the packer's promise), then padding
        layout = [(8, 4), (4, 4, 4), (12,), (16,), (4, 8)][rng.integers(5)]
        start = 0
        for s, n in enumerate(layout):
            positions[r, start:start + n] = np.arange(n)
            segment_ids[r, start:start + n] = s
            prompt = rng.integers(1, n)
            labels[r, start + prompt:start + n] = tokens[r, start + prompt:start + n]
            start += n
    supervised = labels != IGNORE
    batch = dict(tokens=tokens, labels=labels, positions=positions, segment_ids=segment_ids)
    # The step's noise: one key per row of the global batch, split from the step key in row order.
    noise = jax.jit(functools.partial(diffusion.noise_batch, mask_token_id=model_config.mask_token_id,
                                      eps=config.diffusion.eps))
    for attempt in range(100):  # a key that leaves some supervised token unmasked
        key = jax.random.fold_in(jax.random.key(seed), attempt)
        noised = jax.device_get(noise(jax.random.split(key, rows), tokens, labels, segment_ids))
        if 0 < noised.masked.sum() < supervised.sum():
            break
    masked, p = np.asarray(noised.masked), np.asarray(noised.p, np.float64)
    assert not masked[~supervised].any()

    # [noisy | clean], both copies at the same positions; blk = position // B inside a segment.
    ids = np.concatenate([noised.noisy_tokens, tokens], axis=1)
    pos2 = np.concatenate([positions, positions], axis=1)
    seg2 = np.concatenate([segment_ids, segment_ids], axis=1)
    clean = np.arange(2 * length) >= length
    q_blk, k_blk = (pos2 // block)[:, :, None], (pos2 // block)[:, None, :]
    q_clean, k_clean = clean[None, :, None], clean[None, None, :]
    same = (seg2[:, :, None] == seg2[:, None, :]) & (seg2[:, :, None] >= 0)
    mask = same & ((~q_clean & ~k_clean & (k_blk == q_blk)) | (~q_clean & k_clean & (k_blk < q_blk))
                   | (q_clean & k_clean & (k_blk <= q_blk)))
    mask |= np.eye(2 * length, dtype=bool)[None]  # padding queries see themselves (unused, no NaN)
    forward = nnx.jit(lambda m, *inputs: m(*inputs, attn_impl="reference"))
    logits = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos2), jnp.asarray(mask)),
                        np.float64)[:, :length]
    top = logits.max(-1, keepdims=True)
    lse = (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)[..., 0]
    ce = lse - np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    expected = np.sum(np.where(masked, ce / p, 0.0)) / supervised.sum()

    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.train)
    step = make_train_step(graphdef, tx, config, model_config)
    shaped = {k: jnp.asarray(v, jnp.int32).reshape(accum, micro, length) for k, v in batch.items()}
    _, _, metrics = step(params, tx.init(params), shaped, key)
    assert masked.sum() < supervised.sum()  # ÷ #masked would give another value
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["supervised_tokens"]) == supervised.sum()
    assert float(metrics["masked_fraction"]) == pytest.approx(masked.sum() / supervised.sum(), rel=1e-6)
