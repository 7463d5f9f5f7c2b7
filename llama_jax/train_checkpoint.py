"""Training checkpoints: async Orbax steps under WORKDIR/checkpoints/, verified on restore.

    ckpt = Manager(workdir, model_config, save_every=500, keep=3, run_config=config.to_dict())
    restored = ckpt.restore_latest(abstract_state, train_iter)   # Restored(state, step, ...)
    ckpt.save(step, state, train_iter)                           # async; every save_every steps

Layout:

    checkpoints/<step>/state/           the TrainState pytree (Orbax StandardSave, OCDBT)
    checkpoints/<step>/data/            Grain iterator state, process_<p>-of-<n>.json
    checkpoints/<step>/checksums.json   size and CRC-32 of every file above, and `run_config`
    checkpoints/config.json, tokenizer.model   model config (checkpoint.py's format), tokenizer
    previous_run/                       what train.restart replaced, until this run saves a step

Damage is never fatal and never silent: a partially written step is removed, a step whose state
files do not match their checksums (or do not restore) is skipped with one warning naming the
file, a step whose data-iterator state alone is lost keeps its weights (`Restored.data_problem`).
Which steps a config may resume at all is decided in `llama_jax.resume`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import shutil
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax import checksums
from llama_jax.checkpoint import CONFIG_FILE, FORMAT, TOKENIZER_FILE, load_config
from llama_jax.config import ModelConfig

ITEMS = ("state", "data")
CHECKPOINTS_DIR = "checkpoints"
# Where `Manager.start_over` (train.restart) moves the run it replaces: kept whole until the new
# run has saved a step, so a restart that dies early loses nothing.
PREVIOUS_RUN_DIR = "previous_run"
RUN_FILES = ("metrics.jsonl", "tensorboard")  # the rest of a run's record, moved along with it


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Manager.restore_latest` found. state None: nothing restored (step 0)."""
    state: Any
    step: int
    # Why the data-iterator state of `step` could not be restored (its weights were), or None.
    data_problem: str | None = None
    # "step N: why" for each newer step that was skipped.
    skipped: tuple[str, ...] = ()


class Manager:
    """Async Orbax checkpoints of a training run under `workdir/checkpoints/`.

    Each step directory holds the items `state` (the TrainState pytree, StandardSave) and `data`
    (the Grain iterator state, one JSON file per process), and `checksums.json`: size and CRC-32
    of every item file plus `run_config` (the experiment config that saved it), written on
    Orbax's background save thread before the step is renamed into place. The model config and
    tokenizer are written beside the steps together with the first step this Manager saves, so a
    run that fails before saving leaves no claim on the workdir.
    """

    def __init__(self, workdir: str, model_config: ModelConfig, *, save_every: int, keep: int,
                 tokenizer_file: str | None = None, run_config: dict | None = None):
        if keep < 1 or save_every < 0:
            raise ValueError(f"keep ({keep}) must be >= 1 and save_every ({save_every}) >= 0 "
                             f"(0 = only when forced, e.g. at the end and on SIGTERM).")
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        self._model_config, self._tokenizer_file = model_config, tokenizer_file
        self._run_config = run_config
        self._save_every, self._keep = save_every, keep
        # Steps handed to Orbax whose checksums are not written yet, oldest first: Orbax runs
        # one save at a time, and save() hands over the next step before it waits for the last.
        self._saving: collections.deque[int] = collections.deque()
        self._wrote_run_files = False
        self._remove_partial()
        self._previous = self._previous_run()
        self._mgr = self._orbax()

    def _orbax(self) -> ocp.CheckpointManager:
        never = (lambda step, last: False) if self._save_every == 0 else None  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(self._save_every, 1), should_save_fn=never,
            max_to_keep=self._keep, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        return ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def _remove_partial(self):
        """Orbax writes a step to `<step>.orbax-checkpoint-tmp*` and renames it when complete;
        a leftover one was killed mid-save. It is never read; say so and remove it."""
        for name in sorted(os.listdir(self.directory) if os.path.isdir(self.directory) else []):
            if ocp.utils.TMP_DIR_SUFFIX in name and jax.process_index() == 0:
                logging.warning("Checkpoint %s was only partially written (killed mid-save?); "
                                "removing it: the last complete step is used instead.", name)
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _previous_run(self) -> str | None:
        """previous_run/ if a restart left it; removed here once this run has a step of its own
        (a restart that was killed after saving, before it could remove it)."""
        path = os.path.join(self.workdir, PREVIOUS_RUN_DIR)
        if not os.path.isdir(path):
            return None
        if complete_steps(self.directory):
            _remove(path)
            return None
        logging.warning("%s holds the run that train.restart replaced; it is removed once this "
                        "run saves its first checkpoint.", path)
        return path

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Starts an async save if `step` is due (or `force`) and not saved yet; returns whether
        it saved. The first save also writes config.json and the tokenizer beside the steps."""
        self._drop_previous_once_saved()
        if self._mgr.latest_step() == step or not (force or self._mgr.should_save(step)):
            return False
        if not self._wrote_run_files:
            self._write_run_files()
        if jax.process_index() == 0:  # where Orbax runs the callback
            self._saving.append(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter))
        return self._mgr.save(step, args=args, force=True)

    def _write_run_files(self):
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            _write_json(os.path.join(self.directory, CONFIG_FILE),
                        {"format": FORMAT, "model": self._model_config.to_dict()})
            if self._tokenizer_file:
                shutil.copyfile(self._tokenizer_file, os.path.join(self.directory, TOKENIZER_FILE))
        self._wrote_run_files = True

    def _write_checksums(self):
        """Orbax's post-finalization callback: the primary process's background save thread,
        after every process wrote its files, before the step directory is renamed into place
        (or, where Orbax commits by a marker file instead, in the final directory)."""
        step = self._saving.popleft()
        tmp = glob.glob(os.path.join(self.directory, f"{step}{ocp.utils.TMP_DIR_SUFFIX}*"))
        step_dir = tmp[0] if tmp else os.path.join(self.directory, str(step))
        checksums.write(step_dir, ITEMS, extra={"run_config": self._run_config})

    def _drop_previous_once_saved(self):
        if self._previous and complete_steps(self.directory):
            _remove(self._previous)
            self._previous = None

    def start_over(self, reason: str) -> None:
        """train.restart: moves this workdir's steps, metrics and TensorBoard logs to
        previous_run/ (replacing an older one) and starts empty; previous_run/ is removed once
        this run has saved its first step."""
        self._mgr.close()
        previous = os.path.join(self.workdir, PREVIOUS_RUN_DIR)
        if jax.process_index() == 0:
            if complete_steps(self.directory) and os.path.isdir(previous):
                _remove(previous)  # an older replaced run: what is being replaced now is newer
            os.makedirs(previous, exist_ok=True)
            for name in (CHECKPOINTS_DIR, *RUN_FILES):
                src = os.path.join(self.workdir, name)
                if os.path.exists(src) and not os.path.exists(os.path.join(previous, name)):
                    os.rename(src, os.path.join(previous, name))
                elif os.path.exists(src):  # what is there is older; this one never saved
                    _remove(src)
            logging.warning("train.restart: %s; moved the previous run to %s, which is removed "
                            "once this run saves its first checkpoint.", reason, previous)
        _barrier("checkpoint:start_over")
        self._previous = previous
        self._mgr = self._orbax()

    # -- restoring ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def saved_shapes(self, step: int) -> dict[str, tuple] | None:
        """{path: shape} of the state arrays saved at `step`, from Orbax's metadata (no array is
        read); None if the metadata is unreadable (the restore then reports why)."""
        try:
            tree = self._mgr.item_metadata(step)["state"]
            leaves = jax.tree_util.tree_leaves_with_path(tree)
        except Exception:  # noqa: BLE001 - a damaged step is reported by restore_latest
            return None
        return {tree_path(p): tuple(leaf.shape) for p, leaf in leaves}

    def restore_latest(self, abstract_state, data_iter) -> Restored:
        """The latest step whose state files match their checksums and restore; a damaged step
        is skipped with one warning in favour of the one before it, and once an earlier step
        restored it is kept as `<step>.damaged` (out of Orbax's sight, so the run saves that
        step anew; delete it when it is of no more use).

        The data-iterator state is restored separately: if it is missing or damaged the step's
        weights are still restored and `data_problem` says why (the caller replays the data)."""
        skipped, bad = [], []
        for step in sorted(self._mgr.all_steps(), reverse=True):
            record, state = None, None
            try:
                record = checksums.read(os.path.join(self.directory, str(step)))
                problem = self._check_files(step, record, under="state/")
                if problem is None:
                    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                    state = self._mgr.restore(step, args=args).state
            except Exception as e:  # noqa: BLE001 - an unreadable step is skipped
                problem = describe(e)
            if problem is None:
                self._set_aside(bad)
                return Restored(state, step, self._restore_data(step, record, data_iter),
                                tuple(skipped))
            logging.warning("Checkpoint step %d in %s cannot be restored: %s; trying the step "
                            "before it.", step, self.directory, problem)
            skipped.append(f"step {step}: {problem}")
            bad.append(step)
        return Restored(None, 0, None, tuple(skipped))

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = f"{src}.damaged", 1
                while os.path.exists(dst):
                    dst, n = f"{src}.damaged-{n}", n + 1
                os.rename(src, dst)
        _barrier("checkpoint:set_aside")
        self._mgr.reload()

    def _check_files(self, step, record, *, under="", names=None) -> str | None:
        """The checksum verdict on the step's files, the same on every process: process 0
        reads the (shared) state files; each process its own data file."""
        if record is None:
            return None  # saved before checksums were written: Orbax's own checks only
        verdict = ""
        if names is not None or jax.process_index() == 0:
            problems = checksums.verify(os.path.join(self.directory, str(step)), record,
                                        under=under, names=names)
            verdict = "; ".join(problems[:2])
            verdict += f" and {len(problems) - 2} more files" if len(problems) > 2 else ""
        if names is None and jax.process_count() > 1:
            verdict = multihost_utils.broadcast_one_to_all(_encode(verdict))
            verdict = _decode(verdict)
        return verdict or None

    def _restore_data(self, step, record, data_iter) -> str | None:
        name = f"data/process_{jax.process_index()}-of-{jax.process_count()}.json"
        problem = self._check_files(step, record, names={name})
        if problem is None:
            try:
                args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter))
                self._mgr.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - the weights are kept; data is replayed
                problem = describe(e)
        return problem

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        self._mgr.wait_until_finished()
        self._drop_previous_once_saved()
        self._mgr.close()


def complete_steps(directory: str) -> list[int]:
    """The steps Orbax finalized in a checkpoints directory (no temporary ones), ascending."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def tree_path(path) -> str:
    """"opt_state/1/0/mu/embed" for a jax key path, alike for saved dicts and live namedtuples,
    dataclasses and tuples."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(n) for n in names)


def describe(e: BaseException) -> str:
    """An exception on one line: the innermost cause (Orbax wraps TensorStore's readable error
    in a message that ends in the repr of a bound method), whitespace collapsed."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _encode(text: str):
    out = np.zeros(1024, np.uint8)
    data = text.encode()[:1024]
    out[:len(data)] = np.frombuffer(data, np.uint8)
    return out


def _decode(array) -> str:
    return bytes(np.asarray(array, np.uint8)).rstrip(b"\0").decode(errors="replace")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _write_json(path: str, obj) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _remove(path: str) -> None:
    """Removes a file or folder, on process 0 only (the others see the same filesystem)."""
    if jax.process_index() != 0:
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def check_workdir(workdir: str, model_config: ModelConfig) -> str | None:
    """Why `workdir`'s checkpoints belong to a model with another architecture, or None (also
    when it holds no complete step: a config.json without steps claims nothing)."""
    path = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    if not (os.path.isfile(os.path.join(path, CONFIG_FILE)) and complete_steps(path)):
        return None
    saved, ours = load_config(path).arch(), model_config.arch()
    diff = [f"{k} {saved[k]} != {ours[k]}" for k in ours if saved[k] != ours[k]]
    if diff:
        return f"{workdir} holds checkpoints of another model (saved vs configured: " \
               f"{'; '.join(diff)})"
    return None
