"""Never lose a run (llama_jax.resume, train.run): a workdir this config cannot resume is refused
before anything compiles and keeps every byte; train.restart starts over and removes the old
run only once the new one saved; a damaged latest step is skipped with one warning and the run
repeats the straight run's losses exactly; a lost iterator state is replayed exactly.

One straight run (module fixture) is copied into each test's workdir, then damaged or resumed
with another config."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import checkpoint, train, train_checkpoint
from test_train import _metrics, _must_not_run, tiny_config
from test_train_checkpoint import flip_middle_byte

STEPS = 12
RUN = {"train.steps": STEPS, "train.checkpoint_every": 5, "train.keep_checkpoints": 3,
       "train.eval_every": 0, "train.sample_tokens": 0}


def config(**overrides):
    return tiny_config(**{**RUN, **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run straight to STEPS: checkpoints at steps 5, 10 and 12, metrics and export."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.run(config(), workdir)
    assert train_checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [5, 10, 12]
    return workdir


def _copy(straight, tmp_path, *, drop=()):
    """The straight run's workdir without its metrics (so they show only what a rerun logs),
    its export, and the checkpoint steps in `drop`."""
    workdir = str(tmp_path / "w")
    shutil.copytree(straight, workdir)
    for path in ("metrics.jsonl", "export", *(f"checkpoints/{s}" for s in drop)):
        path = os.path.join(workdir, path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return workdir


def _assert_repeats(straight, workdir, steps):
    """The rerun logged exactly `steps`, with the straight run's losses, and exported the same
    parameters."""
    a, b = _metrics(straight), _metrics(workdir)
    assert sorted(b) == list(steps)
    for step in steps:
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"])
    pa, pb = (nnx.to_pure_dict(nnx.state(checkpoint.load_params(os.path.join(w, "export")),
                                         nnx.Param)) for w in (straight, workdir))
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def _files(root):
    """{relative path: bytes} of every file under root."""
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


@pytest.mark.slow
def test_flipped_byte_in_latest_step_resumes_from_the_one_before(straight, tmp_path, caplog,
                                                                   capsys):
    workdir = _copy(straight, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "12")
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
             for n in names]
    largest = max(files, key=os.path.getsize)
    flip_middle_byte(largest)
    with caplog.at_level("WARNING"):
        train.run(config(), workdir)
    assert "Resumed from step 10" in capsys.readouterr().out
    name = os.path.relpath(largest, step_dir)
    assert [r.getMessage() for r in caplog.records if name in r.getMessage()] == [
        f"Checkpoint step 12 in {os.path.join(workdir, 'checkpoints')} cannot be restored: "
        f"{name} does not match the checksum saved with it; trying the step before it."]
    _assert_repeats(straight, workdir, [11, 12])
    # The damaged step is kept beside the one saved anew.
    assert os.path.isfile(os.path.join(workdir, "checkpoints", "12.damaged", name))
    assert train_checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [5, 10, 12]


@pytest.mark.slow
def test_lost_iterator_state_keeps_the_step_and_replays_the_data(straight, tmp_path, caplog):
    workdir = _copy(straight, tmp_path, drop=[12])
    os.remove(os.path.join(workdir, "checkpoints", "10", "data", "process_0-of-1.json"))
    with caplog.at_level("WARNING"):
        train.run(config(), workdir)
    assert "replaying the 10 batches before it" in caplog.text
    _assert_repeats(straight, workdir, [11, 12])  # from step 10, not from 5 or 0


def _saved(tmp_path, cfg):
    """A workdir holding step 5 of `cfg`'s TrainState (zeros, as run() builds it), saved by the
    Manager as a run does: the refusals need no trained run."""
    model_config = train.ModelConfig.from_dict(cfg.model.to_dict())
    _, params = nnx.split(train.abstract(model_config), nnx.Param)
    tx = train.optim.make_optimizer(train.optim_config(cfg), params)
    built = jax.eval_shape(lambda p: train.init_state(p, tx), nnx.to_pure_dict(params))
    workdir = str(tmp_path / "w")
    mgr = train_checkpoint.Manager(workdir, model_config, save_every=5, keep=3,
                                   run_config=cfg.to_dict())
    zeros = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), built)
    mgr.save(5, zeros, iter(train.data.grain.MapDataset.range(9).to_iter_dataset()))
    mgr.close()
    return workdir


def test_changed_optimizer_structure_is_refused_before_compiling(tmp_path, monkeypatch):
    workdir = _saved(tmp_path, config())
    before = _files(workdir)
    monkeypatch.setattr(train.sharding, "init_sharded", _must_not_run)
    monkeypatch.setattr(train.sharding, "jit_step", _must_not_run)
    with pytest.raises(ValueError) as e:
        train.run(config(**{"optim.clip_norm": 0.0}), workdir)
    message = str(e.value)
    assert "cannot restore" in message and "optim.clip_norm 1.0 -> 0.0" in message
    assert "--config.train.restart=True" in message and "\n" not in message
    assert _files(workdir) == before  # every byte kept


@pytest.mark.parametrize("override, field", [
    ({"data.global_batch": 16}, "data.global_batch 8 -> 16"),
    ({"data.seq_len": 32}, "data.seq_len 64 -> 32")])
def test_another_batch_shape_is_refused_before_compiling(tmp_path, monkeypatch, override,
                                                         field):
    workdir = _saved(tmp_path, config())
    before = _files(workdir)
    monkeypatch.setattr(train, "abstract", _must_not_run)
    with pytest.raises(ValueError, match=f"another batch shape \\({field}\\).*restart=True"):
        train.run(config(**override), workdir)
    assert _files(workdir) == before


@pytest.mark.slow
def test_restart_keeps_the_old_run_until_the_new_one_saved(straight, tmp_path, monkeypatch):
    workdir = _copy(straight, tmp_path)
    shutil.copyfile(os.path.join(straight, "metrics.jsonl"), os.path.join(workdir, "metrics.jsonl"))
    before = _files(workdir)
    # checkpoint_every 0: saved only at the end, so the old run waits until the very end.
    restart = config(**{"optim.clip_norm": 0.0, "train.restart": True,
                        "train.checkpoint_every": 0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the restarted run dies before its first checkpoint
    with monkeypatch.context() as m:
        m.setattr(train, "_initial_state", killed)
        with pytest.raises(KeyboardInterrupt):
            train.run(restart, workdir)
    previous = os.path.join(workdir, "previous_run")
    assert _files(previous) == before  # the old run, whole, beside an empty new one
    assert not train_checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))

    train.run(restart, workdir)
    assert not os.path.exists(previous)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))  # one run
    assert train_checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [STEPS]


def test_failed_start_leaves_no_claim_on_the_workdir(tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match="matches no files"):
        train.run(config(**{"data.files": str(tmp_path / "nothing" / "*.txt"),
                            "data.name": "missing"}), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "config.json"))
    other = llama_jax.get_config("tiny", n_layers=3)
    assert train_checkpoint.check_workdir(workdir, other) is None  # another model may use it


@pytest.mark.parametrize("override, message", [
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints is 0 but must be >= 1"),
    ({"train.log_every": 0}, "train.log_every is 0 but must be >= 1"),
    ({"train.checkpoint_every": -1}, r"must be >= 0 \(0 = only at the end and on SIGTERM\)"),
    ({"optim.accumulation_steps": 0}, "optim.accumulation_steps is 0 but must be >= 1"),
    ({"train.eval_batches": 0}, "set train.eval_every=0 to skip evaluation"),
    ({"mesh.backend": "tpu9"}, "unknown backend 'tpu9'; valid: auto, plain, cpu"),
    ({"mesh.attention": "flash"}, "mesh.attention='flash' is not available on the cpu"),
])
def test_counts_are_checked_before_compiling(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(train, "abstract", _must_not_run)
    with pytest.raises(ValueError, match=message):
        train.run(tiny_config(**override), str(tmp_path))
    assert not os.listdir(tmp_path)

