"""The set-up every run shares: one place turns a run config into its pieces.

Validation (the generic field checks of :mod:`dirl_jax.config` plus each owner's names and the
decoding settings, which :class:`~dirl_jax.rollout.sampler.SamplingConfig` checks itself), the
tokenizer, the data (the built-in task's operand-pair split included), the model config, the
device mesh, the model, the run directory, the metrics writer and the final export. SFT, DiPO,
the benchmark evaluation and ``torch_bridge.export`` build their runs from these functions, so a
setting means the same thing in every task.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import mesh as mesh_lib
from dirl_jax.attention import IMPLEMENTATIONS
from dirl_jax.checkpoint import checkpoint_steps, restore_params
from dirl_jax.config import (SPLIT_FIELDS, ConfigValueError, check, check_dipo_fields,
                             check_model_block_size, check_sft_fields, resume_changes)
from dirl_jax.dipo import AGGREGATIONS
from dirl_jax.data import rl as rl_data
from dirl_jax.data import sft as sft_data
from dirl_jax.data import toy
from dirl_jax.data.records import DataError, read_records
from dirl_jax.data.tokenizer import load_tokenizer
from dirl_jax.metrics import MetricsWriter, start_run_dir, write_json_atomic
from dirl_jax.model import SDARConfig, SDARForCausalLM, abstract_model, load_model, save_model
from dirl_jax.model.hf_io import resolve_dtype
from dirl_jax.model.paths import is_run_dir, resolve_model_dir, run_export_dir
from dirl_jax.rollout.engine_names import engine_spec_problem
from dirl_jax.rollout.sampler import SamplingConfig
from dirl_jax.run_lock import lock_run_dir
from dirl_jax.sharding import named_shardings

BUILTIN_TOKENIZER = "builtin:toy"
TRAINING_RECORD = "dirl_training.json"  # in an export: the task and data split its run trained on
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- validation
def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` must be one of an owner's ``choices``."""
    check(value in choices, field, f"must be one of {tuple(choices)}, got {value!r}")


def check_engine(field: str, spec: str) -> None:
    """``spec`` must name a rollout engine (``jax``, ``lmdeploy`` or ``module:Class``)."""
    problem = engine_spec_problem(spec)
    check(problem is None, field, problem or "")


def check_decoding(fields: Mapping[str, Any], section: str) -> None:
    """A section's decoding fields must make a valid :class:`SamplingConfig` (the sampler's own
    checks), reported under the section's field names."""
    try:
        SamplingConfig.from_fields(fields, block_size=1, mask_token_id=0)
    except ValueError as error:
        name, _, message = str(error).partition(": ")
        raise ConfigValueError(f"config.{section}{name}: {message}") from None


def validate_sft(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of an SFT config."""
    check_sft_fields(config)
    check_choice("model.attention_impl", config.model.attention_impl, IMPLEMENTATIONS)
    check_decoding(config.eval, "eval.")


def validate_dipo(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of a DiPO config."""
    check_dipo_fields(config)
    check_engine("rollout.engine", config.rollout.engine)
    check_choice("train.loss_aggregation", config.train.loss_aggregation, AGGREGATIONS)
    check_choice("model.attention_impl", config.model.attention_impl, IMPLEMENTATIONS)
    check_decoding(config.rollout, "rollout.")
    check_decoding(config.eval, "eval.")


# ----------------------------------------------------------------------------- data
def sft_records(config: ConfigDict) -> tuple[list[Any], list[dict[str, Any]]]:
    """SFT training records and held-out evaluation records (question / answer; built-in task
    only, :func:`dirl_jax.data.toy.builtin_split`)."""
    data = config.data
    if data.source == toy.BUILTIN_TASK:
        return toy.builtin_split(data.split_seed, data.builtin_train_size, data.builtin_eval_size,
                                 data.builtin_max_operand)
    return read_records(data.source, data.split), []


def rl_prompts(config: ConfigDict, tokenizer) -> tuple[list[list[int]], list[str], list[dict]]:
    """Prompt token ids and gold answers of the RL records (those longer than
    ``rollout.max_prompt_tokens`` dropped), and held-out eval records (builtin only: the SFT
    split, so no prompt shares an operand pair with them)."""
    data = config.data
    held_out: list[dict] = []
    if data.source == toy.BUILTIN_TASK:
        train, held_out = sft_records(config)
        prompts = [sft_data.encode_prompt(r["messages"][:-1], tokenizer) for r in train]
        answers = [r["answer"] for r in train]
    else:
        template = data.prompt_template or rl_data.DEFAULT_TEMPLATE
        records = rl_data.load_prompt_records(data.source, data.split)
        prompts = [tokenizer.encode(rl_data.render_prompt(r.question, template),
                                    add_special_tokens=False) for r in records]
        answers = [r.answer for r in records]
    limit = config.rollout.max_prompt_tokens
    if limit:
        keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
        if not keep:
            raise DataError(f"{data.source}: no prompt fits rollout.max_prompt_tokens={limit}")
        if len(keep) < len(prompts):
            log.warning("%s: dropped %d of %d prompts longer than rollout.max_prompt_tokens=%d",
                        data.source, len(prompts) - len(keep), len(prompts), limit)
        prompts, answers = [prompts[i] for i in keep], [answers[i] for i in keep]
    return prompts, answers, held_out


# ----------------------------------------------------------------------------- model
def init_model_dir(config: ConfigDict) -> str:
    """The local HF directory ``init_from`` stands for (:func:`resolve_model_dir`: a run
    directory means its export, a hub id is downloaded); empty without ``init_from``."""
    return resolve_model_dir(config.init_from) if config.init_from else ""


def init_checkpoint(config: ConfigDict) -> tuple[str, int, str] | None:
    """``(step directory's parent, step, saved parameter dtype)`` of the latest committed
    checkpoint when ``init_from`` is a training run directory that has one: training continues
    from the run's own (e.g. fp32) parameters; its ``export`` (often bf16) is for serving."""
    if not config.init_from or not is_run_dir(config.init_from):
        return None
    directory = os.path.join(config.init_from, "checkpoints")
    steps = checkpoint_steps(directory) if os.path.isdir(directory) else []
    if not steps:
        return None
    with open(os.path.join(config.init_from, "config.json"), encoding="utf-8") as f:
        saved_dtype = json.load(f).get("train", {}).get("param_dtype", "float32")
    return directory, steps[-1], saved_dtype


def build_tokenizer(config: ConfigDict):
    """``config.tokenizer`` (the built-in character tokenizer, a directory or hub id), else the
    tokenizer next to the initial weights."""
    if config.tokenizer == BUILTIN_TOKENIZER:
        return toy.toy_tokenizer()
    return load_tokenizer(config.tokenizer or init_model_dir(config))


def build_model_config(config: ConfigDict, tokenizer) -> SDARConfig:
    """The architecture: ``init_from``'s config.json, or ``config.model`` for a fresh model."""
    if config.init_from:
        model_config = SDARConfig.from_pretrained(init_model_dir(config))
        if "diffusion" in config:  # SFT trains with its own block size: it must be the model's
            check_model_block_size(config, model_config.block_size)
        return model_config
    m = config.model
    return SDARConfig(
        vocab_size=m.vocab_size or len(tokenizer), hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim, block_size=m.block_size, mask_token_id=tokenizer.mask_token_id,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def build_mesh(config: ConfigDict, model_config: SDARConfig, rows: int, rows_field: str
               ) -> jax.sharding.Mesh:
    """``config.mesh`` over every device of the run, checked against the model and the number of
    ``rows`` one step shards over data x fsdp (named ``rows_field`` in errors)."""
    shape = mesh_lib.mesh_shape(config.mesh, jax.device_count())
    mesh_lib.check_mesh_fits(shape, model_config, rows, rows_field=rows_field)
    return mesh_lib.make_mesh(shape)


def build_model(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh
                ) -> SDARForCausalLM:
    """The model with every parameter created (or loaded from ``init_from``) straight into its
    sharding on ``mesh``, in the run's compute and parameter dtypes."""
    dtype = resolve_dtype(config.train.compute_dtype)
    param_dtype = resolve_dtype(config.train.param_dtype)
    found = init_checkpoint(config)
    if found:
        return restore_run_params(model_config, mesh, *found, dtype=dtype, param_dtype=param_dtype,
                                  remat=config.model.remat)
    if config.init_from:
        model, _ = load_model(init_model_dir(config), dtype, param_dtype=param_dtype, mesh=mesh,
                              remat=config.model.remat)
        return model
    return mesh_lib.sharded_model(
        lambda: SDARForCausalLM(model_config, rngs=nnx.Rngs(config.seed), dtype=dtype,
                                param_dtype=param_dtype, remat=config.model.remat), mesh)


def restore_run_params(model_config: SDARConfig, mesh: jax.sharding.Mesh, directory: str,
                       step: int, saved_dtype: str, *, dtype: Any, param_dtype: Any,
                       remat: bool) -> SDARForCausalLM:
    """The model with the parameters of checkpoint ``step`` under ``directory`` (checked against
    their fingerprint, read in the dtype they were saved in), placed in their shardings on
    ``mesh`` and cast to ``param_dtype``."""
    abstract = abstract_model(model_config, dtype=dtype, param_dtype=resolve_dtype(saved_dtype),
                              remat=remat)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = named_shardings(params, mesh)
    target = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                          params, shardings)
    restored = restore_params(directory, step, target)
    cast = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(param_dtype), tree),
                   out_shardings=shardings)
    print(f"init_from: parameters of {os.path.join(directory, str(step))} ({saved_dtype})", flush=True)
    return nnx.merge(graphdef, cast(restored), rest)


# ----------------------------------------------------------------------------- run directory
def check_resume(config: ConfigDict) -> None:
    """A run directory with checkpoints is resumed: refuses a config whose math differs from the
    saved ``config.json`` (:func:`dirl_jax.config.resume_changes`), listing every difference."""
    saved_path = os.path.join(config.run_dir, "config.json")
    checkpoints = os.path.join(config.run_dir, "checkpoints")
    if not (os.path.isfile(saved_path) and os.path.isdir(checkpoints) and checkpoint_steps(checkpoints)):
        return
    with open(saved_path, encoding="utf-8") as f:
        saved = json.load(f)
    changes = resume_changes(saved, json.loads(json.dumps(config.to_dict())),
                             config.resume.allow_changes)
    check(not changes, "resume.allow_changes",
          f"{config.run_dir} is resumed from its checkpoints, but this config changes what its "
          f"saved {saved_path} computed: {'; '.join(changes)}. Use the saved values, or name the "
          f"fields: --config.resume.allow_changes={','.join(c.split(':')[0] for c in changes)}")


def start_run(config: ConfigDict, tokenizer) -> tuple[str, str]:
    """Creates the run directory with ``config.json`` and a copy of the tokenizer (process 0
    writes, after locking the directory: :mod:`dirl_jax.run_lock`); returns the absolute run
    directory and the tokenizer copy's path. Call it only once everything was validated: nothing
    is written before."""
    if jax.process_index() == 0:
        lock_run_dir(config.run_dir)
    check_resume(config)
    run_dir = start_run_dir(config.run_dir, config.to_dict())
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if jax.process_index() == 0 and not os.path.isdir(tokenizer_dir):
        tokenizer.save_pretrained(tokenizer_dir + ".tmp")
        os.replace(tokenizer_dir + ".tmp", tokenizer_dir)
    return run_dir, tokenizer_dir


def metrics_writer(config: ConfigDict, run_dir: str, start: int) -> MetricsWriter:
    """The run's metrics (JSONL, TensorBoard, console), continued from step ``start``."""
    return MetricsWriter(run_dir, resume_step=start, total_steps=config.train.num_steps,
                         enabled=jax.process_index() == 0)


def draw_curves(run_dir: str) -> None:
    """``RUN_DIR/metrics.png`` (process 0) when matplotlib is installed; a line saying how
    otherwise."""
    if jax.process_index() != 0:
        return
    if importlib.util.find_spec("matplotlib") is None:
        print('metrics.png not drawn: pip install -e ".[plot]" (matplotlib), then '
              f"python scripts/plot_metrics.py {run_dir}", flush=True)
        return
    from dirl_jax.plots import plot_run
    plot_run(run_dir)


def export(config: ConfigDict, model: SDARForCausalLM, model_config: SDARConfig, run_dir: str,
           tokenizer_dir: str) -> None:
    """``RUN_DIR/export``: the final model as a HF SDAR directory, when ``export.enabled``, with
    the run's training record."""
    if config.export.enabled:
        directory = os.path.join(run_dir, "export")
        save_model(model, model_config, directory, tokenizer_dir=tokenizer_dir,
                   dtype=config.export.dtype, overwrite=True)
        write_training_record(directory, config, run_dir)


def write_training_record(directory: str, config: ConfigDict | Mapping[str, Any], run_dir: str) -> None:
    """``TRAINING_RECORD`` in an exported model directory: the run, its task and its data
    section, so a later stage starting from the export can check it keeps the held-out split."""
    data = config["data"]
    write_json_atomic(os.path.join(directory, TRAINING_RECORD),
                      {"run_dir": os.path.abspath(run_dir), "task": config["task"],
                       "init_from": config["init_from"],
                       "data": data.to_dict() if isinstance(data, ConfigDict) else dict(data)})


def training_record(model_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The file recording how the model at ``model_dir`` was trained, and its contents (``data``
    and ``init_from`` among them): a run directory's config, an export's training record, or the
    config of the run an export sits in; None for a model no run of this project trained."""
    path = os.path.abspath(os.fspath(model_dir))
    parent = os.path.dirname(path)
    for file, applies in ((os.path.join(path, "config.json"), is_run_dir(path)),
                          (os.path.join(path, TRAINING_RECORD), True),
                          (os.path.join(parent, "config.json"),
                           is_run_dir(parent) and run_export_dir(parent) == path)):
        if applies and os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
            return (file, record) if isinstance(record.get("data"), dict) else None
    return None


def trained_sources(model_dir: str) -> list[tuple[str, str]]:
    """``(record file, data.source)`` of every stage that trained ``model_dir``, following
    ``init_from`` back (SFT, then DiPO, ...) to a model no run of this project trained."""
    sources: list[tuple[str, str]] = []
    seen: set[str] = set()
    current = os.fspath(model_dir)
    while current and os.path.abspath(current) not in seen:
        seen.add(os.path.abspath(current))
        found = training_record(current)
        if found is None:
            break
        file, record = found
        sources.append((file, str(record["data"].get("source", ""))))
        current = record.get("init_from") or ""
    return sources


def check_same_split(config: ConfigDict) -> None:
    """On the built-in task, a run starting from a model that a built-in-task run trained must
    hold out exactly the operand pairs that run held out, else its held-out problems could be ones
    an earlier stage trained on. Every stage (SFT and DiPO, from a run directory or an export)
    checks the one before it, so a chain keeps one split."""
    if config.data.source != toy.BUILTIN_TASK or not config.init_from:
        return
    found = training_record(config.init_from)
    if found is None or found[1]["data"].get("source") != toy.BUILTIN_TASK:
        return
    file, saved = found[0], found[1]["data"]
    for field in SPLIT_FIELDS:
        check(saved.get(field) == config.data[field], f"data.{field}",
              f"{config.data[field]!r} differs from {saved.get(field)!r}, the split of the run that "
              f"trained init_from ({file}): the held-out split must stay the one every earlier "
              "stage used")
