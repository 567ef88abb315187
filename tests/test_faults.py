"""Faults are features: a full disk stops a run at once with the file's name (no hang), metrics
rows survive any resume, a torn metrics line is tolerated where it can be and named where it
cannot, and a second writer of a run directory is refused."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dirl_jax import metrics as metrics_lib
from dirl_jax.checkpoint import checkpoint_steps
from dirl_jax.run_lock import RunDirLocked, lock_run_dir, unlock_run_dir
from dirl_jax.trainers import sft as sft_trainer
from test_train import read_metrics, tiny_run_config

ROW = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0}


@pytest.fixture
def deadline():
    """Fails the test instead of hanging it: SIGALRM after 600 s."""
    def expire(*_):
        raise TimeoutError("the test hung for 600 s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(600)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_full_disk_under_metrics_jsonl_is_an_error_naming_the_file(tmp_path, deadline):
    writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=3)
    writer._file = open("/dev/full", "a", encoding="utf-8")  # the kernel answers ENOSPC
    with pytest.raises(metrics_lib.MetricsWriteError) as error:
        writer.write([{"step": 1, **ROW}])
    assert error.value.errno == errno.ENOSPC
    assert f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device" in str(error.value)


def test_a_full_disk_under_tensorboard_stops_the_run_at_that_step(tmp_path, monkeypatch, deadline):
    """The TensorBoard events file fails at the third step's write: run_sft raises (no hang:
    the writer is synchronous), naming the directory, with the rows before it written."""
    writes = []

    class FullDisk(metrics_lib.EventsWriter):
        def flush(self):
            writes.append(1)
            if len(writes) >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().flush()
    monkeypatch.setattr(metrics_lib, "EventsWriter", FullDisk)
    config = tiny_run_config(tmp_path / "run", log_every=1)
    with pytest.raises(metrics_lib.MetricsWriteError,
                       match=f"cannot write {tmp_path / 'run' / 'tensorboard'}: No space left on device"):
        sft_trainer.run_sft(config)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    unlock_run_dir(str(tmp_path / "run"))


FULL_DISK_RUN = """
import sys
sys.path.insert(0, {tests!r})
from dirl_jax import checkpoint
from dirl_jax.checkpoint import CheckpointWriteError
from dirl_jax.trainers import sft
from test_train import tiny_run_config
if sys.argv[2] == "background":  # the free-space check passes: orbax's own write fails
    checkpoint.free_bytes = lambda directory: 1 << 60
try:
    sft.run_sft(tiny_run_config(sys.argv[1], num_steps=9, log_every=1))
except CheckpointWriteError as e:
    print("ERROR", e, flush=True)
"""


def can_mount_a_small_filesystem() -> bool:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_a_small_filesystem(), reason="needs user namespaces (unshare -rm)")
@pytest.mark.parametrize("where", ["free_space_check", "background"])
def test_a_full_disk_under_checkpoints_stops_the_run_within_a_step(tmp_path, where):
    """A real 128 KiB filesystem (a tmpfs in a private mount namespace) under the run: the
    checkpoint of step 1 (~190 KB of state) cannot fit. Either the free-space check refuses it
    before writing, or orbax's background write fails and the next step's save raises it; the run
    stops naming the checkpoint directory and the disk's error, and never hangs."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    script = tmp_path / "run.py"
    script.write_text(FULL_DISK_RUN.format(tests=str(pathlib.Path(__file__).parent)))
    shell = (f"mount -t tmpfs -o size=128k tmpfs {mount} && "
             f"{sys.executable} {script} {mount / 'run'} {where}; "
             f"cp {mount / 'run' / 'metrics.jsonl'} {tmp_path}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True,
                          timeout=300)
    error = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert error, done.stdout + done.stderr[-3000:]
    assert f"cannot write a checkpoint under {mount / 'run' / 'checkpoints'}" in error[0] or (
        f"cannot write the checkpoint of step 1 under {mount / 'run' / 'checkpoints'}" in error[0])
    if where == "free_space_check":
        assert "it needs at least 0.18 MiB and the disk has" in error[0]
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    else:
        assert "No space left on device" in error[0]
        # orbax saves step 1 (its first) and then every 3rd step: the failure of step 1's
        # background write stops the run at step 2's check (if it has failed by then) or at step
        # 3's save at the latest (which waits for it). Rows reach the file before their save.
        assert len(read_metrics(tmp_path)) <= 3


def test_metrics_rows_survive_a_crash_between_flushes(tmp_path, monkeypatch):
    """log_every = 2 and a checkpoint every 3 steps: the run dies during step 4, after the
    checkpoint of step 3 and before rows 3-4 were due. Rows reach the file before their step's
    checkpoint, so the resumed run's metrics hold every step exactly once."""
    real = sft_trainer.step_key

    def dies_in_step_4(base_key, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real(base_key, step)
    monkeypatch.setattr(sft_trainer, "step_key", dies_in_step_4)
    config = tiny_run_config(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        sft_trainer.run_sft(config)
    for _ in range(600):  # the asynchronous save of step 3 commits in the background
        if (tmp_path / "run" / "checkpoints" / "3").is_dir():
            break
        time.sleep(0.1)
    monkeypatch.setattr(sft_trainer, "step_key", real)
    sft_trainer.run_sft(config)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **ROW}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=3, total_steps=6)
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert f"{path}: line 4 is incomplete" in caplog.text


def test_a_malformed_line_before_the_end_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, **ROW}) + "\nnot json\n" + json.dumps({"step": 2, **ROW}) + "\n")
    with pytest.raises(ValueError, match=f"{path}: line 2 is not a metrics row"):
        metrics_lib.MetricsWriter(str(tmp_path), resume_step=2, total_steps=6)


HOLD = """
import sys, time
from dirl_jax.run_lock import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_not(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"{run_dir}: another run writes this directory "
                                               rf'\(\{{"host": ".+", "pid": {holder.pid}, "started": '):
            lock_run_dir(str(run_dir))
        config = tiny_run_config(run_dir, num_steps=1)
        with pytest.raises(RunDirLocked):
            sft_trainer.run_sft(config)
        assert not (run_dir / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # kill -9: the kernel drops its lock, the file stays
        holder.wait()
    assert (run_dir / ".lock").exists()
    lock_run_dir(str(run_dir))
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    unlock_run_dir(str(run_dir))


def test_resume_refuses_a_config_that_changes_the_math(tmp_path):
    """A run directory with checkpoints is resumed: a changed learning rate and seed are listed
    and refused before anything is written; naming them in resume.allow_changes lets it go."""
    from dirl_jax.config import ConfigValueError
    run_dir = tmp_path / "run"
    sft_trainer.run_sft(tiny_run_config(run_dir, num_steps=3))
    saved = (run_dir / "config.json").read_text()
    changed = tiny_run_config(run_dir, num_steps=4, learning_rate=1e-3)
    changed.seed = 7
    with pytest.raises(ConfigValueError) as error:
        sft_trainer.run_sft(changed)
    message = str(error.value)
    assert message.startswith("config.resume.allow_changes: ")
    assert "seed: 0 -> 7; train.learning_rate: 0.003 -> 0.001" in message
    assert "--config.resume.allow_changes=seed,train.learning_rate" in message
    assert (run_dir / "config.json").read_text() == saved and len(read_metrics(run_dir)) == 3
    changed.resume.allow_changes = "seed,train.learning_rate"
    sft_trainer.run_sft(changed)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_which_changes_count_as_math():
    from dirl_jax.config import resume_changes, sft_defaults
    saved = json.loads(json.dumps(sft_defaults().to_dict()))
    assert saved["train"]["schedule"] == "cosine"

    def changed(**edits):
        new = json.loads(json.dumps(saved))
        for field, value in edits.items():
            *sections, name = field.split("__")
            node = new
            for section in sections:
                node = node[section]
            node[name] = value
        return new
    free = changed(run_dir="elsewhere", train__log_every=7, eval__num_examples=1, mesh__data=4,
                   checkpoint__every_steps=5, export__dtype="float32", model__attention_impl="tiled",
                   model__remat=True)
    assert resume_changes(saved, free, "") == []
    steps = saved["train"]["num_steps"]
    assert resume_changes(saved, changed(train__num_steps=2 * steps), "") == [  # the cosine depends on it
        f"train.num_steps: {steps} -> {2 * steps}"]
    constant = changed(train__schedule="constant")
    assert resume_changes(constant, changed(train__schedule="constant", train__num_steps=2 * steps), "") == []
    math = changed(model__hidden_size=64, data__max_length=32, diffusion__block_size=8)
    assert [c.split(":")[0] for c in resume_changes(saved, math, "")] == [
        "data.max_length", "diffusion.block_size", "model.hidden_size"]
    assert [c.split(":")[0] for c in resume_changes(saved, math, "model, data.max_length")] == [
        "diffusion.block_size"]


def checkpointed_run(tmp_path, steps: int = 3):
    """A tiny SFT run with a checkpoint at every step (all kept)."""
    config = tiny_run_config(tmp_path / "run", num_steps=steps)
    config.checkpoint.update(every_steps=1, keep=10)
    config.eval.num_examples = 0
    sft_trainer.run_sft(config)
    return config


def corrupt_fingerprint(step_dir) -> None:
    """What a flipped bit in the stored parameters looks like to the restore: state bits that
    differ from the fingerprint saved with them."""
    meta = step_dir / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["fingerprint"]["params"][0] ^= 1
    meta.write_text(json.dumps(saved))


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_resumes(tmp_path, capsys):
    straight = tiny_run_config(tmp_path / "straight", num_steps=4)
    straight.eval.num_examples = 0
    sft_trainer.run_sft(straight)
    config = checkpointed_run(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    corrupt_fingerprint(checkpoints / "3")
    (checkpoints / "2" / "state" / "_METADATA").write_text('{"tree_metadata": {')  # truncated
    config.train.num_steps = 4
    sft_trainer.run_sft(config)
    out = capsys.readouterr().out
    assert f"{checkpoints / '3'}: ValueError: {checkpoints / '3'}: the restored params differ from the " \
           "fingerprint saved with them" in out
    assert f"{checkpoints / '2'}: " in out and f"resumed from {checkpoints / '1'}" in out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    # the unreadable steps were moved aside and saved again by the resumed run
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints_unreadable").iterdir()) == ["2", "3"]
    assert checkpoint_steps(checkpoints) == [1, 2, 3, 4]
    unlock_run_dir(str(tmp_path / "run"))
    from dirl_jax.checkpoint import restore_params
    from dirl_jax.model import SDARConfig, abstract_model
    from flax import nnx
    abstract = nnx.state(abstract_model(SDARConfig.from_pretrained(tmp_path / "run" / "export")), nnx.Param)
    restore_params(checkpoints, 3, abstract)  # intact now


def test_a_corrupt_final_checkpoint_is_redone_by_the_rerun(tmp_path):
    """The last step's checkpoint unreadable: the rerun resumes from the one before, trains the
    last step again and saves it (orbax would refuse to save over the unreadable one)."""
    config = checkpointed_run(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    corrupt_fingerprint(checkpoints / "3")
    sft_trainer.run_sft(config)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert checkpoint_steps(checkpoints) == [1, 2, 3]
    assert [p.name for p in (tmp_path / "run" / "checkpoints_unreadable").iterdir()] == ["3"]


def test_no_intact_checkpoint_is_an_error_never_a_fresh_start(tmp_path):
    from dirl_jax.checkpoint import CheckpointCorrupt, restore_params
    config = checkpointed_run(tmp_path, steps=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in ("1", "2"):
        corrupt_fingerprint(checkpoints / step)
    config.train.num_steps = 3
    with pytest.raises(CheckpointCorrupt, match=f"no checkpoint can be restored: {checkpoints / '2'}: "):
        sft_trainer.run_sft(config)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]  # nothing was redone
    unlock_run_dir(str(tmp_path / "run"))
    from dirl_jax.model import SDARConfig, abstract_model
    from flax import nnx
    abstract = nnx.state(abstract_model(SDARConfig.from_pretrained(tmp_path / "run" / "export")), nnx.Param)
    with pytest.raises(ValueError, match=f"{checkpoints / '2'}: the restored params differ"):
        restore_params(checkpoints, 2, abstract)  # what the export reads
