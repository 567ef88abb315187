"""Run configuration: ml_collections defaults and the generic checks of their fields (errors name
the field). This module is the bottom of the layering and imports nothing from ``dirl_jax``: the
names an owner defines (attention implementations, unmasking strategies, loss aggregations,
benchmarks, engines) and the decoding settings are checked by their owners, composed in
:mod:`dirl_jax.run`."""

from __future__ import annotations

from typing import Any, Sequence

from ml_collections import ConfigDict, config_dict

SCHEDULES = ("cosine", "constant")
# The built-in task (dirl_jax.data.toy.builtin_split): held-out problems are builtin_eval_size
# operand pairs drawn by split_seed; SFT and DiPO from it must use the same split fields.
BUILTIN_DATA = dict(split_seed=0, builtin_train_size=20000, builtin_eval_size=500,
                    builtin_max_operand=49)
SPLIT_FIELDS = ("source", "split_seed", "builtin_eval_size", "builtin_max_operand")
DTYPES = ("float32", "bfloat16")


class ConfigValueError(ValueError):
    """A run configuration field is missing, malformed or inconsistent."""


def check(ok: bool, field: str, message: str) -> None:
    """Raises ConfigValueError naming ``config.<field>`` unless ``ok``."""
    if not ok:
        raise ConfigValueError(f"config.{field}: {message}")


# Fields a resumed run may change freely: where it writes, how long it runs (unless the schedule
# depends on it), logging, checkpoints, evaluation, export, the mesh, kernels, memory and the
# rollout engine's plumbing. Every other difference from the saved config changes the math.
RESUMABLE = ("run_dir", "train.num_steps", "train.log_every", "checkpoint", "eval", "export", "mesh",
             "resume", "model.attention_impl", "model.remat", "rollout.engine", "rollout.engine_options",
             "rollout.slots", "rollout.commit", "rewards.grade_timeout", "rewards.grade_workers")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _covered(field: str, names: Sequence[str]) -> bool:
    return any(field == n or field.startswith(n + ".") for n in names)


def resume_changes(saved: dict[str, Any], new: dict[str, Any], allowed: str) -> list[str]:
    """``field: saved -> new`` for every field where the run being resumed (``saved``, its
    ``config.json``) and the new config (``new``, as JSON) differ in a way that changes the math:
    not :data:`RESUMABLE` (``train.num_steps`` is, unless a cosine schedule depends on it) and not
    named (or under a section named) in ``allowed`` (comma-separated)."""
    names = [n.strip() for n in allowed.split(",") if n.strip()]
    before, after = _flat(saved), _flat(new)
    free = list(RESUMABLE)
    if after.get("train.schedule") == "cosine":
        free.remove("train.num_steps")
    return [f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}"
            for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k) and not _covered(k, free) and not _covered(k, names)]


# The decoding settings of every section that samples (DiPO's `rollout`, the built-in `eval`, a
# benchmark evaluation): the fields of dirl_jax.rollout.sampler.SamplingConfig a run sets, built
# into one by dirl_jax.run.sampling_config. steps = 0 means the block size.
DECODING_FIELDS = ("strategy", "steps", "threshold", "max_new_tokens", "temperature", "top_k",
                   "top_p", "min_new_tokens")


def decoding_defaults(**overrides: Any) -> dict[str, Any]:
    """The decoding fields with their defaults (sampled dynamic decoding at T = 1)."""
    fields = dict(strategy="low_confidence_dynamic", steps=0, threshold=0.9, max_new_tokens=32,
                  temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise KeyError(f"not decoding fields: {sorted(unknown)}")
    return {**fields, **overrides}


# how the in-process engine writes a completed block's clean keys/values (dirl_jax.rollout.decoder)
COMMIT_MODES = ("auto", "fused", "separate")
# The built-in held-out evaluation: greedy (T = 0) one-token-per-step decoding, room for the
# built-in task's longest worked answer (34 response tokens) and block alignment.
BUILTIN_EVAL_DECODING = dict(strategy="low_confidence_static", temperature=0.0, max_new_tokens=40)


def sft_defaults() -> ConfigDict:
    """Every field of an SFT run, with defaults; configs/*.py start from here."""
    config = ConfigDict()
    config.task = "sft"
    config.run_dir = "runs/sft"
    config.seed = 0
    config.init_from = ""                 # run dir (its latest checkpoint), HF dir or hub id; empty: random `model`
    config.tokenizer = ""                 # tokenizer dir / hub id; "builtin:toy"; empty: init_from's
    config.model = ConfigDict(dict(       # used when init_from is empty
        vocab_size=0,                     # 0: the tokenizer's size
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, block_size=4, rope_theta=10000.0,
        tie_word_embeddings=False, remat=False,
        attention_impl="auto"))           # dirl_jax.attention impl: auto | reference | tiled | splash | pallas_gpu | pallas_tpu
    config.data = ConfigDict(dict(
        source="builtin:arithmetic",      # .jsonl/.json/.parquet file, HF datasets name, or builtin:arithmetic
        split="train", max_length=128, overlong="drop", packing_bins=8, **BUILTIN_DATA))
    config.diffusion = ConfigDict(dict(block_size=4, eps=1e-3, loss_chunk=1024))
    # devices of all processes as data x fsdp x tensor; data = 0 takes what fsdp x tensor leave
    config.mesh = ConfigDict(dict(data=0, fsdp=1, tensor=1))
    config.train = ConfigDict(dict(
        num_steps=1000, global_batch=16, grad_accum=1, learning_rate=1e-3, warmup_steps=100,
        schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, decay_norms=False, b1=0.9,
        b2=0.999, adam_eps=1e-8, max_grad_norm=1.0, compute_dtype="float32",
        param_dtype="float32", log_every=10))
    config.checkpoint = ConfigDict(dict(every_steps=500, keep=2))
    config.resume = ConfigDict(dict(allow_changes=""))  # see resume_changes
    config.eval = ConfigDict(dict(num_examples=200, batch_size=100,  # batch_size: decode slots
                                  **decoding_defaults(**BUILTIN_EVAL_DECODING)))
    config.export = ConfigDict(dict(enabled=True, dtype="bfloat16"))
    return config


def check_optimizer_fields(t: ConfigDict) -> None:
    """The ranges of ``train``'s optimizer and logging fields (SFT and DiPO alike)."""
    ranges = [("learning_rate", t.learning_rate > 0, "> 0"), ("adam_eps", t.adam_eps > 0, "> 0"),
              ("max_grad_norm", t.max_grad_norm > 0, "> 0"), ("weight_decay", t.weight_decay >= 0, ">= 0"),
              ("b1", 0 <= t.b1 < 1, "in [0, 1)"), ("b2", 0 <= t.b2 < 1, "in [0, 1)"),
              ("min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"), ("log_every", t.log_every > 0, "> 0"),
              ("warmup_steps", t.warmup_steps >= 0, ">= 0")]
    for name, ok, expected in ranges:
        check(ok, f"train.{name}", f"must be {expected}, got {t[name]!r}")


def check_sft_fields(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of an SFT config (the
    generic checks; :func:`dirl_jax.run.validate_sft` adds the owners')."""
    t = config.train
    check(config.task == "sft", "task", f"must be 'sft', got {config.task!r}")
    check(bool(config.run_dir), "run_dir", "must be set")
    check(t.num_steps > 0, "train.num_steps", f"must be positive, got {t.num_steps}")
    check(t.global_batch > 0, "train.global_batch", f"must be positive, got {t.global_batch}")
    check(t.grad_accum > 0, "train.grad_accum", f"must be positive, got {t.grad_accum}")
    check_optimizer_fields(t)
    check(t.global_batch % t.grad_accum == 0, "train.global_batch",
          f"({t.global_batch}) must be divisible by train.grad_accum ({t.grad_accum})")
    check(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}, got {t.schedule!r}")
    for field in ("compute_dtype", "param_dtype"):
        check(t[field] in DTYPES, f"train.{field}", f"must be one of {DTYPES}, got {t[field]!r}")
    check(config.data.overlong in ("drop", "truncate"), "data.overlong",
          f"must be 'drop' or 'truncate', got {config.data.overlong!r}")
    block = config.diffusion.block_size
    check(block > 0, "diffusion.block_size", f"must be positive, got {block}")
    check(0 < config.diffusion.eps < 1, "diffusion.eps", f"must be in (0, 1), got {config.diffusion.eps}")
    check(config.diffusion.loss_chunk > 0, "diffusion.loss_chunk", "must be positive")
    check(config.data.max_length > 0, "data.max_length", f"must be positive, got {config.data.max_length}")
    check(config.data.max_length % block == 0, "data.max_length",
          f"({config.data.max_length}) must be a multiple of diffusion.block_size ({block})")
    if not config.init_from:
        check(config.model.block_size == block, "model.block_size",
              f"({config.model.block_size}) must equal diffusion.block_size ({block})")
        check(bool(config.tokenizer), "tokenizer", "must be set when init_from is empty")
    check(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
    check(config.checkpoint.keep > 0, "checkpoint.keep", "must be positive")


def check_model_block_size(config: ConfigDict, model_block_size: int) -> None:
    """The model's own block size (used by its attention mask) must match the training one."""
    if model_block_size != config.diffusion.block_size:
        raise ConfigValueError(
            f"config.diffusion.block_size ({config.diffusion.block_size}) differs from the model's "
            f"block_size ({model_block_size}) in {config.init_from}/config.json")


def dipo_defaults() -> ConfigDict:
    """Every field of a DiPO run, with defaults; configs/dipo_*.py start from here."""
    config = ConfigDict()
    config.task = "dipo"
    config.run_dir = "runs/dipo"
    config.seed = 0
    config.init_from = ""                 # an SFT run directory (its latest checkpoint) or a HF directory / hub id
    config.tokenizer = ""                 # default: the tokenizer next to init_from's weights
    config.model = ConfigDict(dict(attention_impl="auto", remat=False))
    config.mesh = ConfigDict(dict(data=0, fsdp=1, tensor=1))  # this host's devices (see sft_defaults)
    config.data = ConfigDict(dict(
        source="builtin:arithmetic",      # question/ground_truth_answer .jsonl/.json/.parquet, HF name, builtin
        split="train", prompt_template="",  # "" = DiRL's rollout prompt (builtin: the SFT chat format)
        **BUILTIN_DATA))
    config.rollout = ConfigDict(dict(
        prompts_per_step=8, group_size=8, **decoding_defaults(),
        oversample=0,                     # prompts drawn per sampling round = oversample x prompts_per_step;
                                          # 0: the original's rule (dirl_jax.dipo.oversample_factor)
        max_prompt_tokens=0,              # longer prompts are dropped; 0 = keep all
        slots=0,                          # in-process engine: rows decoded at once, refilled as rows
                                          # finish (continuous batching); 0 = every row of a call
        commit="auto",                    # in-process engine: fused | separate | auto (fused off CPU)
        engine="jax",                     # "jax" (in-process), "lmdeploy" (torch_bridge's client)
                                          # or "module:Class" of a RolloutEngine
        engine_options=ConfigDict(dict(   # external engine: e.g. servers="http://h:23333,http://h2:23333",
            servers="", weight_push="",   # weight_push="ipc" | "nccl:HOST:PORT" | "agents:URL,..."
            model_dir="",                 # the served export (default: init_from's HF directory)
            api_key_env=""))))            # the variable holding the servers'/agents' shared key
                                          # (sent as Authorization: Bearer; never in a config);
                                          # "" = the engine's default, $DIRL_API_KEY
    config.rewards = ConfigDict(dict(names=("accuracy",), weights=(), grade_timeout=10.0,
                                     latex_fallback=True,  # the original's sympy fallback (rewards.grade)
                                     grade_workers=4))     # grading processes at once, each call timed out
    config.train = ConfigDict(dict(
        num_steps=50, learning_rate=1e-5, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
        weight_decay=0.0, decay_norms=False, b1=0.9, b2=0.999, adam_eps=1e-8, max_grad_norm=1.0,
        compute_dtype="float32", param_dtype="float32", log_every=1, ppo_iterations=1,
        eps_low=0.2, eps_high=0.28, log_ratio_clamp=10.0, advantage="zscore",
        loss_aggregation="token_mean",    # token_mean (DAPO) / sequence_mean (GRPO) / step_mean (paper)
        kl_beta=0.0,                      # k3 KL weight to the frozen init_from policy
        old_logprobs="sampler",           # old policy: the sampler's log-probs or the trainer's
        dynamic_sampling=True, max_sampling_rounds=4,
        canvas_rows=8, row_length=1024,   # one micro-batch: rows x slots of the multi-round canvas
        logprob_chunk=1024,               # scored tokens per vocabulary chunk
        max_log_ratio=0.01))              # |log ratio| allowed between sampler and trainer at iteration 0
    config.checkpoint = ConfigDict(dict(every_steps=10, keep=2))
    config.resume = ConfigDict(dict(allow_changes=""))  # see resume_changes
    config.eval = ConfigDict(dict(num_examples=200, every_steps=10, batch_size=100,
                                  **decoding_defaults(**BUILTIN_EVAL_DECODING)))
    config.export = ConfigDict(dict(enabled=True, dtype="bfloat16"))
    return config


def check_dipo_fields(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of a DiPO config (the generic
    checks; :func:`dirl_jax.run.validate_dipo` adds the owners')."""
    r, t = config.rollout, config.train
    check(config.task == "dipo", "task", f"must be 'dipo', got {config.task!r}")
    check(bool(config.run_dir), "run_dir", "must be set")
    check(bool(config.init_from), "init_from", "must name an SFT run directory or a HF checkpoint")
    check(t.num_steps > 0, "train.num_steps", f"must be positive, got {t.num_steps}")
    check_optimizer_fields(t)
    check(config.rewards.grade_workers >= 1, "rewards.grade_workers",
          f"must be >= 1, got {config.rewards.grade_workers}")
    check(r.prompts_per_step > 0, "rollout.prompts_per_step", "must be positive")
    check(r.oversample >= 0, "rollout.oversample", f"must be >= 0 (0 = automatic), got {r.oversample}")
    check(r.max_prompt_tokens >= 0, "rollout.max_prompt_tokens", "must be >= 0")
    check(r.slots >= 0, "rollout.slots", f"must be >= 0 (0 = every row at once), got {r.slots}")
    check(r.commit in COMMIT_MODES, "rollout.commit",
          f"must be one of {', '.join(COMMIT_MODES)}, got {r.commit!r}")
    check(r.group_size > 1, "rollout.group_size", f"must be > 1 (group advantages), got {r.group_size}")
    check(r.min_new_tokens == 0, "rollout.min_new_tokens",
          f"must be 0 in DiPO, got {r.min_new_tokens}: barring stop tokens changes the policy that "
          "samples, and the trainer scores tokens under the unconstrained one (DiRL's rollouts set "
          "none, DIRL_SPEC §2.2)")
    check(t.advantage in ("zscore", "center"), "train.advantage",
          f"must be 'zscore' or 'center', got {t.advantage!r}")
    check(t.ppo_iterations > 0, "train.ppo_iterations", "must be positive")
    check(t.old_logprobs in ("sampler", "trainer"), "train.old_logprobs",
          f"must be 'sampler' or 'trainer', got {t.old_logprobs!r}")
    check(r.engine == "jax" or t.old_logprobs == "trainer", "train.old_logprobs",
          "must be 'trainer' with an external rollout engine (LMDeploy returns no dLLM log-probs)")
    check(t.kl_beta >= 0, "train.kl_beta", f"must be >= 0, got {t.kl_beta}")
    check(t.canvas_rows > 0 and t.row_length > 0 and t.logprob_chunk > 0,
          "train.canvas_rows/row_length/logprob_chunk", "must be positive")
    check(t.max_sampling_rounds > 0, "train.max_sampling_rounds", "must be positive")
    check(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}, got {t.schedule!r}")
    check(not config.rewards.weights or len(config.rewards.weights) == len(config.rewards.names),
          "rewards.weights", f"needs one weight per reward in {tuple(config.rewards.names)}")
    for name in ("compute_dtype", "param_dtype"):
        check(t[name] in DTYPES, f"train.{name}", f"must be one of {DTYPES}, got {t[name]!r}")


# DIRL_SPEC §7.1: the paper's evaluation decoding (block 4, 4 denoising steps per block, T = 1,
# top-k 50, at least 128 new tokens); "static" commits one token per step, "dynamic" every token
# above the confidence threshold.
DECODING_PRESETS = {
    "dirl_dynamic": dict(strategy="low_confidence_dynamic", steps=0, threshold=0.9, temperature=1.0,
                         top_k=50, top_p=1.0, min_new_tokens=128),
    "dirl_static": dict(strategy="low_confidence_static", steps=0, threshold=0.9, temperature=1.0,
                        top_k=50, top_p=1.0, min_new_tokens=128),
}


def eval_defaults() -> ConfigDict:
    """Every field of a benchmark evaluation (`python -m dirl_jax.evaluate`), with defaults."""
    config = ConfigDict()
    config.task = "evaluate"
    config.model = ""                     # HF SDAR directory, hub id, or a training run directory
    config.tokenizer = ""                 # default: the tokenizer next to the model's weights
    config.output_dir = "runs/eval"
    config.seed = 0
    config.benchmarks = "math500,gsm8k,aime24,aime25,olympiadbench"  # comma-separated
    config.data_dir = ""                  # default: the shared benchmark files (DIRL_BENCHMARK_DIR)
    config.source = ""                    # one file or HF dataset name (with a single benchmark)
    config.source_split = ""              # HF dataset split; "" = "test" if it has one, else its only split
    config.prompt_template = ""           # "" = DiRL's prompt (DIRL_SPEC §2.1)
    config.limit = 0                      # first N questions per benchmark; 0 = all
    config.samples_per_question = 16      # k: accuracy is the mean pass@1 over k samples
    config.max_new_tokens = 8192
    config.decoding = "dirl_dynamic"      # a DECODING_PRESETS name; the fields below override it
    for name, kind in (("strategy", str), ("steps", int), ("threshold", float),
                       ("temperature", float), ("top_k", int), ("top_p", float),
                       ("min_new_tokens", int)):
        config[name] = config_dict.placeholder(kind)
    config.batch_size = 64                # prompts per engine call (per host)
    config.engine = "jax"                 # "jax" (in-process), "lmdeploy" or "module:Class"
    config.engine_options = ConfigDict(dict(  # external engine: comma-separated URLs, and the
        servers="", api_key_env=""))      # variable holding their key ("" = $DIRL_API_KEY)
    config.compute_dtype = "bfloat16"
    config.attention_impl = "auto"
    config.grade_timeout = 10.0           # seconds per answer
    config.grade_workers = 4              # grading processes at once, each call timed out
    config.latex_fallback = True          # the original's sympy fallback next to math-verify
    return config


def eval_decoding(config: ConfigDict) -> dict:
    """The decoding preset named by ``config.decoding`` with the fields the config sets."""
    preset = dict(DECODING_PRESETS[config.decoding])
    return {k: preset[k] if config.get(k) is None else config[k] for k in preset}


def benchmark_names(config: ConfigDict) -> list[str]:
    """The comma-separated ``benchmarks`` of an evaluation config."""
    return [b.strip() for b in config.benchmarks.split(",") if b.strip()]


def check_eval_fields(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of an evaluation config (the
    generic checks; :func:`dirl_jax.run.validate_eval` adds the owners')."""
    check(bool(config.model), "model", "must name a HF SDAR directory, hub id or run directory")
    check(bool(config.output_dir), "output_dir", "must be set")
    names = benchmark_names(config)
    check(bool(names), "benchmarks", "must name at least one benchmark")
    check(not config.source or len(names) == 1, "source", "needs exactly one benchmark")
    check(config.decoding in DECODING_PRESETS, "decoding",
          f"must be one of {tuple(DECODING_PRESETS)}, got {config.decoding!r}")
    check(config.limit >= 0, "limit", f"must be >= 0, got {config.limit}")
    check(config.samples_per_question > 0, "samples_per_question", "must be positive")
    check(config.max_new_tokens > 0, "max_new_tokens", "must be positive")
    check(config.batch_size > 0, "batch_size", "must be positive")
    check(config.grade_timeout > 0, "grade_timeout", f"must be > 0, got {config.grade_timeout}")
    check(config.grade_workers >= 1, "grade_workers", f"must be >= 1, got {config.grade_workers}")
    check(config.compute_dtype in DTYPES, "compute_dtype",
          f"must be one of {DTYPES}, got {config.compute_dtype!r}")

