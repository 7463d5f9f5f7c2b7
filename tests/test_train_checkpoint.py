"""Training checkpoints (train_checkpoint.Manager) on a small pytree: resume selection, damaged
steps skipped with one whole warning, lost iterator state, save cadence, what is written when,
and train.restart's previous_run kept until the new run has saved."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax import checksums, train_checkpoint


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(value):
    # 64 KiB of random (incompressible) weights: the largest file of a step is array data, as
    # in a real run.
    w = jax.random.normal(jax.random.key(value), (16384,), jnp.float32)
    return {"w": w, "step": jnp.int32(value)}


ABSTRACT = jax.eval_shape(lambda: _state(0))


def _manager(workdir, config=None, **kwargs):
    config = config or llama_jax.get_config("tiny")
    kwargs = {"save_every": 1, "keep": 5, **kwargs}
    return train_checkpoint.Manager(str(workdir), config, run_config={"data": {}}, **kwargs)


def _save_steps(workdir, steps, **kwargs):
    mgr, it = _manager(workdir, **kwargs), _iterator()
    for step in steps:
        next(it)
        assert mgr.save(step, _state(step), it)
    mgr.close()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_restores_latest_with_iterator_state_and_checksums(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    for step in (1, 2, 3):  # written before the step was renamed into place
        step_dir = tmp_path / "checkpoints" / str(step)
        record = checksums.read(str(step_dir))
        on_disk = {os.path.relpath(os.path.join(d, n), step_dir)
                   for item in ("state", "data") for d, _, names in os.walk(step_dir / item)
                   for n in names}
        assert set(record["files"]) == on_disk and record["run_config"] == {"data": {}}
    it = _iterator()
    restored = _manager(tmp_path).restore_latest(ABSTRACT, it)
    assert restored.step == 3 and int(restored.state["step"]) == 3
    assert restored.data_problem is None and restored.skipped == ()
    np.testing.assert_array_equal(restored.state["w"], _state(3)["w"])
    assert next(it) == 3  # three elements were consumed before the save


def _largest_state_file(step_dir):
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
             for n in names]
    return max(files, key=os.path.getsize)


def flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def test_flipped_byte_skips_the_step_with_one_warning_naming_the_file(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    bad = _largest_state_file(str(tmp_path / "checkpoints" / "2"))
    flip_middle_byte(bad)
    with caplog.at_level("WARNING"):
        restored = _manager(tmp_path).restore_latest(ABSTRACT, _iterator())
    assert restored.step == 1 and int(restored.state["step"]) == 1
    name = os.path.relpath(bad, tmp_path / "checkpoints" / "2")
    [warning] = [w for w in _warnings(caplog) if "step 2" in w]
    assert name in warning and "checksum" in warning and "\n" not in warning
    assert restored.skipped == (f"step 2: {name} does not match the checksum saved with it",)
    # Kept, out of the way: the run can save step 2 anew.
    assert os.path.isfile(os.path.join(tmp_path, "checkpoints", "2.damaged", name))
    assert train_checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [1]


def test_partial_and_unreadable_steps_are_skipped_with_whole_messages(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "4.orbax-checkpoint-tmp-1234").mkdir()  # killed mid-save: never renamed
    (ckpt_dir / "4.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"\x00")
    shutil.rmtree(ckpt_dir / "3" / "state")  # step 3 finalized, then its array data lost
    # Step 2 as an older version saved it (no checksums), then truncated: Orbax's own error,
    # which wraps TensorStore's in a message ending in the repr of a bound method.
    os.remove(ckpt_dir / "2" / checksums.FILE)
    bad = _largest_state_file(str(ckpt_dir / "2"))
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    with caplog.at_level("WARNING"):
        restored = _manager(tmp_path).restore_latest(ABSTRACT, _iterator())
    assert restored.step == 1 and int(restored.state["step"]) == 1
    warnings = _warnings(caplog)
    assert sum("4.orbax-checkpoint-tmp-1234 was only partially written" in w
               for w in warnings) == 1
    [three] = [w for w in warnings if "step 3" in w]
    assert "state/" in three and "is missing" in three and "more files" in three
    [two] = [w for w in warnings if "step 2" in w]
    assert "bound method" not in two and "\n" not in two and two.endswith("before it."), two
    assert "OCDBT" in two and "byte range" in two  # TensorStore's own words: what and where
    assert not os.path.exists(ckpt_dir / "4.orbax-checkpoint-tmp-1234")


def test_lost_iterator_state_keeps_the_weights(tmp_path):
    _save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json")
    it = _iterator()
    restored = _manager(tmp_path).restore_latest(ABSTRACT, it)
    assert restored.step == 2 and int(restored.state["step"]) == 2
    assert restored.data_problem == "data/process_0-of-1.json is missing"
    assert next(it) == 0  # untouched: the caller replays the data


def test_save_every_zero_saves_only_when_forced_and_keep_must_be_positive(tmp_path):
    mgr, it = _manager(tmp_path, save_every=0), _iterator()
    assert not any(mgr.save(step, _state(step), it) for step in range(1, 6))
    assert mgr.save(6, _state(6), it, force=True)
    mgr.close()
    assert train_checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [6]
    with pytest.raises(ValueError, match="keep"):
        _manager(tmp_path / "other", keep=0)


def test_config_json_is_written_with_the_first_step_only(tmp_path):
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer")
    mgr = train_checkpoint.Manager(str(tmp_path / "w"), llama_jax.get_config("tiny"),
                                   save_every=1, keep=1, tokenizer_file=str(tok))
    assert not os.path.exists(tmp_path / "w" / "checkpoints" / "config.json")
    mgr.save(1, _state(1), _iterator())
    mgr.close()
    with open(tmp_path / "w" / "checkpoints" / "config.json") as f:
        assert json.load(f)["model"] == llama_jax.get_config("tiny").to_dict()
    assert (tmp_path / "w" / "checkpoints" / "tokenizer.model").read_bytes() == b"tokenizer"


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_start_over_keeps_the_old_run_until_the_new_one_saved(tmp_path):
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n')
    before = _snapshot(tmp_path)
    mgr = _manager(tmp_path)
    mgr.start_over("a test")
    previous = tmp_path / "previous_run"
    assert _snapshot(previous) == before and mgr.steps() == []
    mgr.close()  # killed before its first save: the old run is still whole
    mgr = _manager(tmp_path)  # the relaunch
    assert _snapshot(previous) == before
    it = _iterator()
    next(it)
    assert mgr.save(1, _state(1), it)
    mgr.wait()
    mgr.save(2, _state(2), it)  # the step after the first save finalized: the old run goes
    assert not previous.exists()
    mgr.close()
    assert train_checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [1, 2]


def test_check_workdir_names_another_architecture_only_with_steps(tmp_path):
    other = llama_jax.get_config("tiny", n_layers=3)
    _manager(tmp_path).close()  # no step saved: the workdir belongs to nobody
    assert train_checkpoint.check_workdir(str(tmp_path), other) is None
    _save_steps(tmp_path, [1])
    assert "n_layers 2 != 3" in train_checkpoint.check_workdir(str(tmp_path), other)
    # Execution options (dtype, remat, scan) may change between runs.
    same = llama_jax.get_config("tiny", remat="full", dtype="bfloat16")
    assert train_checkpoint.check_workdir(str(tmp_path), same) is None
