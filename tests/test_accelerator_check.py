"""scripts/accelerator_check.py: the whole check at tiny shapes on the CPU (``--smoke``, the CI
guard between accelerator leases), and the rules that make its numbers mean something: kernel
tolerances, a failing kernel never timed, out-of-memory halving, the FLOP count, errors by name."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import accelerator_check as check  # noqa: E402
from bench_train_step import CONFIGS, sdar_config  # noqa: E402

from dirl_jax import canvas as canvas_lib  # noqa: E402
from dirl_jax.model import SDARForCausalLM  # noqa: E402


def smoke_context(kernel: str = "tiled") -> check.Context:
    return check.Context(shapes=check.SMOKE, platform="cpu", kernel=kernel, peak=1e9, train_rows=2,
                         results={})


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_the_report(tmp_path):
    """One process on the CPU: every section ``ok``, the interpreted Pallas kernel and ``tiled``
    equal to the reference on all three canvases in both dtypes, both then timed, and the JSON and
    markdown reports written."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "accelerator_check.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(check.SECTIONS, "ok")
    equality = sections["kernel_equality"]["rows"]
    assert {(r["canvas"], r["dtype"], r["kernel"]) for r in equality} == {
        (c, d, k) for c in ("sft_two_stream", "dipo_multi_round", "decode")
        for d in ("float32", "bfloat16") for k in ("pallas_gpu", "tiled")}
    assert all(r["result"] == "pass" for r in equality)
    timed = {(r["impl"], r["pass"]) for r in sections["kernel_speed"]["rows"] if r["result"] == "timed"}
    assert {("pallas_gpu", "fwd"), ("pallas_gpu", "fwd_bwd"), ("tiled", "fwd_bwd")} <= timed
    train = sections["train_step"]["rows"][0]
    assert train["rows"] == 2 and train["canvas_len"] == 2 * check.SMOKE.train_tokens
    assert 0 < train["mfu_of_measured_peak"] and np.isfinite(train["first_loss"])
    rollout = sections["rollout"]["rows"][0]
    assert rollout["prompts"] == check.SMOKE.prompts and rollout["tokens_per_step"] >= 1
    assert sections["dipo_update"]["rows"][0]["scored_tokens"] > 0
    markdown = (tmp_path / "accelerator_check.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in check.SECTIONS)


def test_tolerances_and_section_shares_are_the_documented_ones():
    assert check.TOLERANCE == {"float32": 1e-4, "bfloat16": 3e-2}
    assert check.PLATFORM_KERNEL == {"gpu": "pallas_gpu", "tpu": "splash"}
    assert sum(check.SHARE.values()) == pytest.approx(1.0) and set(check.SHARE) == set(check.SECTIONS)
    assert check.FULL.speed_lengths == (16384, 4096, 32768) and check.FULL.speed_heads == (32, 8, 128)
    assert check.FULL.train_tokens == 4096 and check.FULL.prompts == 64


def test_relative_errors_are_per_tensor_and_scaled_by_the_reference():
    want = tuple(np.full(3, 2.0) for _ in range(4))
    got = (want[0] + np.array([0.0, 0.1, 0.0]), *want[1:3], want[3] - 0.5)
    assert check.relative_errors(got, want) == {"out": pytest.approx(0.05), "dq": 0.0, "dk": 0.0,
                                                "dv": pytest.approx(0.25)}


@pytest.mark.parametrize("factor,result", [(1 + 0.5 * check.TOLERANCE["float32"], "pass"),
                                           (1 + 2 * check.TOLERANCE["float32"], "FAIL")])
def test_a_kernel_beyond_tolerance_fails_and_is_never_timed(monkeypatch, factor, result):
    """A kernel whose output is off by a factor fails equality exactly past the fp32 tolerance,
    the section reports ``failed``, and the speed section does not time it."""
    real = check.attention

    def scaled(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        return out * factor if kwargs["impl"] == "tiled" else out
    monkeypatch.setattr(check, "attention", scaled)
    ctx = smoke_context()
    equality = check.check_kernel_equality(ctx, check.TimeBox(600))
    fp32 = [r for r in equality["rows"] if r["dtype"] == "float32"]
    assert {r["result"] for r in fp32} == {result}
    assert equality["status"] == ("ok" if result == "pass" else "failed")
    if result == "pass":
        return
    ctx.results["kernel_equality"] = equality
    monkeypatch.setattr(check, "flex_available", lambda: False)
    speed = check.time_kernels(ctx, check.TimeBox(600))
    tiled = [r for r in speed["rows"] if r["impl"] == "tiled"]
    assert [r["result"] for r in tiled] == ["not timed: failed kernel equality"]
    assert any(r["impl"] == "reference" and r["result"] == "timed" for r in speed["rows"])


def test_kernel_verdicts():
    rows = [{"kernel": "a", "result": "pass"}, {"kernel": "a", "result": "FAIL"}, {"kernel": "a", "result": "pass"},
            {"kernel": "b", "result": "pass"}, {"kernel": "b", "result": "skipped (time box)"},
            {"kernel": "c", "result": "pass"}, {"kernel": "d", "result": "n/a (layout)"}]
    assert check.kernel_verdicts({"rows": rows}) == {"a": "FAIL", "b": "unchecked", "c": "pass"}
    assert check.kernel_verdicts(None) == {}


def test_a_closed_time_box_skips_the_work_and_says_so():
    ctx = smoke_context()
    equality = check.check_kernel_equality(ctx, check.TimeBox(-1))
    assert equality["status"] == "partial"
    assert {r["result"] for r in equality["rows"]} == {"skipped (time box)"}
    speed = check.time_kernels(ctx, check.TimeBox(-1))
    assert speed["status"] == "partial" and {r["equality"] for r in speed["rows"]} >= {"unchecked"}


def test_the_training_step_halves_its_rows_on_out_of_memory(monkeypatch):
    real = check.make_train_step
    attempts = []

    def oom_above_one_row(*args):
        step = real(*args)

        def run(params, opt, batch, key):
            attempts.append(batch["tokens"].shape[1])
            if batch["tokens"].shape[1] > 1:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
            return step(params, opt, batch, key)
        return run
    monkeypatch.setattr(check, "make_train_step", oom_above_one_row)
    ctx = check.Context(shapes=check.SMOKE, platform="cpu", kernel="tiled", peak=1e9, train_rows=4,
                        results={})
    row = check.time_train_step(ctx, check.TimeBox(600))["rows"][0]
    assert attempts[:3] == [4, 2, 1] and row["rows"] == 1 and ctx.train_rows == 1


def test_other_errors_are_not_taken_for_out_of_memory():
    assert check.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert not check.is_out_of_memory(ValueError("shapes do not match"))


def test_model_flops_count_the_weights_and_the_visible_attention_pairs():
    """Against an independent count: the model's own weight matrices and the dense two-stream mask."""
    config = sdar_config(CONFIGS["tiny"][0])
    rows, n = 3, 32
    model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
    layer0 = nnx.state(model.model.layers[0], nnx.Param)
    layer_weights = sum(x.size for x in jax.tree.leaves(layer0) if x.ndim == 2)
    zeros = np.zeros((1, n), np.int32)
    canvas = canvas_lib.two_stream_canvas(zeros, zeros, np.arange(n)[None], zeros, check.BLOCK_SIZE)[0]
    pairs = int(np.asarray(canvas_lib.dense_mask(canvas)).sum())
    c = config
    expected = rows * (6 * (layer_weights * c.num_hidden_layers * 2 * n + c.hidden_size * c.vocab_size * n)
                       + 3 * 4 * c.num_attention_heads * c.head_dim * pairs * c.num_hidden_layers)
    assert check.model_flops(config, rows, n) == expected


def test_estimated_rows_are_a_power_of_two_that_leaves_room(monkeypatch):
    config = sdar_config(check.SDAR_1_7B)
    params = 2_031_739_904
    class Device:  # an H200's allocator limit; None where a backend keeps no statistics (CPU)
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats
    monkeypatch.setattr(check.jax, "devices", lambda: [Device({"bytes_limit": 139 * 2 ** 30})])
    assert check.estimated_rows(config, params, 4096) == 16
    assert check.estimated_rows(config, params, 2 * 4096) == 8
    monkeypatch.setattr(check.jax, "devices", lambda: [Device(None)])
    assert check.estimated_rows(config, params, 4096) == 2


def test_an_unknown_section_is_an_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        check.parse_args(["--sections", "peak", "kernels"])
    assert ("--sections: unknown kernels; available: peak, kernel_equality, kernel_speed, train_step, "
            "rollout, dipo_update") in capsys.readouterr().err


def test_the_check_imports_nothing_an_accelerator_image_lacks():
    """The lent GPU image has jax, flax, optax, orbax and torch but not grain, math-verify,
    transformers or tokenizers: the script must import without them (and without orbax)."""
    blocked = ("grain", "orbax", "math_verify", "transformers", "tokenizers", "tensorboardX", "datasets")
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO / "scripts")!r})
import accelerator_check
print("imported")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
