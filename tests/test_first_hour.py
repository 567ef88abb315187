"""A new user's session through the command lines, as the README tells it: SFT on the built-in task
-> DiPO from that run directory -> benchmark evaluation -> export -> generate. Every command exits
0, prints no warning and no traceback, starts with a banner and ends naming where its outputs went."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO

TINY_SFT = ["--config", "configs/sft_tiny.py", "--config.model.hidden_size=32",
            "--config.model.intermediate_size=64", "--config.model.num_hidden_layers=1",
            "--config.model.num_attention_heads=2", "--config.model.num_key_value_heads=1",
            "--config.model.head_dim=16", "--config.data.builtin_train_size=200",
            "--config.data.builtin_eval_size=4", "--config.train.num_steps=4",
            "--config.train.global_batch=8", "--config.train.warmup_steps=1",
            "--config.train.log_every=2", "--config.checkpoint.every_steps=2",
            "--config.eval.num_examples=4", "--config.eval.max_new_tokens=8"]
TINY_DIPO = ["--config", "configs/dipo_tiny.py", "--config.data.builtin_train_size=200",
             "--config.data.builtin_eval_size=4", "--config.rollout.prompts_per_step=2",
             "--config.rollout.group_size=3", "--config.rollout.max_new_tokens=8",
             "--config.train.num_steps=2", "--config.train.dynamic_sampling=False",
             "--config.train.canvas_rows=8", "--config.train.row_length=256",
             "--config.eval.num_examples=4", "--config.eval.max_new_tokens=8",
             "--config.eval.every_steps=2"]
WARNING = re.compile(r"warn|traceback|deprecat", re.IGNORECASE)


def command(*args: str) -> str:
    """Runs ``python ARGS`` in the repository; its standard output and error, checked: exit 0,
    and no line that warns."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "DIRL_DEBUG"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not [line for line in output.splitlines() if WARNING.search(line)], output[-4000:]
    return output


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("first_hour")
    sft, dipo = root / "sft", root / "dipo"
    outputs = {
        "sft": command("-m", "dirl_jax.train", *TINY_SFT, f"--config.run_dir={sft}"),
        "dipo": command("-m", "dirl_jax.train", *TINY_DIPO, f"--config.run_dir={dipo}",
                        f"--config.init_from={sft}"),
        "evaluate": command("-m", "dirl_jax.evaluate", "--config", "configs/eval_tiny.py",
                            f"--config.model={dipo}", "--config.benchmarks=gsm8k", "--config.limit=2",
                            "--config.samples_per_question=1", "--config.max_new_tokens=8",
                            f"--config.output_dir={root / 'eval'}"),
        "export": command("-m", "torch_bridge.export", "--checkpoint", str(dipo),
                          "--out", str(root / "served")),
        "generate": command("-m", "dirl_jax.generate", "--model", str(sft), "--prompt",
                            "What is 27 plus 45?", "--max-new-tokens", "8"),
    }
    return root, outputs


def test_a_session_prints_no_warning_and_every_command_exits_0(session):
    root, outputs = session
    assert (root / "served" / "model.safetensors").is_file()
    assert outputs["generate"].strip().splitlines()[-1].startswith("[")


def test_runs_start_with_a_banner_and_end_naming_their_outputs(session):
    root, outputs = session
    for task in ("sft", "dipo"):
        text = outputs[task]
        assert re.search(rf"^{task}: .*{root.name}/{task} \(\d+ steps; ", text, re.MULTILINE), text
        assert "  compiling the first step" in text and " parameters, 1 layers, hidden 32," in text
        for label, name in (("export", "export"), ("held-out eval", "eval.json"),
                            ("curves", "metrics.png"), ("checkpoints", "checkpoints")):
            assert re.search(rf"^  {label} +\S*{task}/{name}", text, re.MULTILINE), (label, text)
            assert (root / task / name).exists()
    assert re.search(r"^sft done: steps 1-4 in \S+; held-out accuracy \d\.\d{3}$", outputs["sft"],
                     re.MULTILINE)
    assert re.search(r"^dipo done: steps 1-2 in \S+ \(rollout \S+, .*train \S+.*\); held-out "
                     r"accuracy \d\.\d{3} -> \d\.\d{3}$", outputs["dipo"], re.MULTILINE)
    assert re.search(r"^  summary +\S*eval/summary\.json", outputs["evaluate"], re.MULTILINE)


def test_the_first_eta_waits_for_a_compiled_step(session):
    _, outputs = session
    etas = re.findall(r"^step (\d+)/4 .*\| eta (\S+)$", outputs["sft"], re.MULTILINE)
    assert etas[0][1] == "measuring" and re.fullmatch(r"\d+m\d\ds", etas[1][1]), etas


def test_dipo_from_a_run_directory_starts_where_sft_ended(session):
    """DiPO's step-0 evaluation of its starting policy equals the SFT run's own (fp32 checkpoint,
    same held-out problems, same decoding), not the bf16 export's."""
    import json
    root, _ = session
    sft = json.loads((root / "sft" / "eval.json").read_text())
    initial = json.loads((root / "dipo" / "eval_initial.json").read_text())
    assert initial["correct"] == sft["correct"]


def test_the_license_is_an_spdx_expression():
    """setuptools warns at every install about a table-form license; an SPDX string it takes."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["build-system"]["requires"][0] == "setuptools>=77"  # the first with SPDX
