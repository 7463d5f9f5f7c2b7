"""Whether a workdir's checkpoints can be resumed by a config, and what happens if not.

A run never silently starts over in a workdir that holds checkpoints: if this config cannot
resume them (another architecture, another batch shape, an optimizer state of another
structure, or no step that restores) the run stops with one sentence saying what differs and
how to proceed. `train.restart=True` starts over in that workdir instead
(`train_checkpoint.Manager.start_over` keeps the old run in previous_run/ until the new run has
saved a step). Checkpoints this config can restore are always resumed, with or without
train.restart, so relaunching a restarted run continues it.

The checks read only JSON and Orbax metadata, and run before anything is compiled.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from llama_jax import checksums, train_checkpoint

_RESTART = ("pass --config.train.restart=True to start over in this workdir (the old run is kept "
            "until the new one saves its first checkpoint) or use a new --workdir")
_HINT = f"rerun with the settings it was saved with, {_RESTART}"


def check_workdir(workdir: str, config, model_config) -> str | None:
    """Refuses (ValueError) a workdir of another architecture or batch shape; with
    train.restart returns why it cannot be resumed instead; None if it can."""
    reason = train_checkpoint.check_workdir(workdir, model_config) or _batch_shape(workdir, config)
    return _refuse_unless_restart(reason, config, _HINT)


def _batch_shape(workdir: str, config) -> str | None:
    """Another data.global_batch or data.seq_len than the latest step was saved with: the
    data position (a count of batches) and the optimizer's progress would mean other things."""
    directory = os.path.join(os.path.abspath(workdir), train_checkpoint.CHECKPOINTS_DIR)
    for step in reversed(train_checkpoint.complete_steps(directory)):
        saved = _run_config(os.path.join(directory, str(step)))
        if saved is None:
            continue
        diff = [f"data.{k} {saved['data'][k]} -> {config.data[k]}"
                for k in ("global_batch", "seq_len") if saved["data"][k] != config.data[k]]
        if diff:
            return (f"checkpoint step {step} in {directory} was trained with another batch "
                    f"shape ({'; '.join(diff)})")
        return None
    return None


def _run_config(step_dir: str) -> dict | None:
    try:
        return (checksums.read(step_dir) or {}).get("run_config")
    except (OSError, ValueError):  # a damaged checksums.json: restore_latest reports the step
        return None


def check_state(ckpt: train_checkpoint.Manager, config, abstract_state) -> str | None:
    """Refuses (ValueError; with train.restart returns why) checkpoints whose saved state tree
    differs from the one this config builds, e.g. an optimizer chain changed by
    optim.clip_norm; names the arrays and the config fields changed since the save."""
    built = {train_checkpoint.tree_path(p): tuple(x.shape)
             for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    for step in reversed(ckpt.steps()):
        saved = ckpt.saved_shapes(step)
        if saved is None:
            continue  # unreadable metadata: restore_latest skips the step with a warning
        what = _difference(saved, built)
        if what is None:
            return None
        changes = config_changes(_run_config(os.path.join(ckpt.directory, str(step))), config)
        reason = (f"checkpoint step {step} in {ckpt.directory} holds a training state this "
                  f"config cannot restore ({what})")
        if changes:
            reason += f"; the config changed since: {changes}"
        return _refuse_unless_restart(reason, config, _HINT)
    return None


def no_restorable_step(ckpt: train_checkpoint.Manager, skipped, config) -> str:
    """Refuses (ValueError; with train.restart returns why) a workdir none of whose
    checkpoints restores: starting from step 0 would let retention delete them."""
    reason = (f"none of the {len(skipped)} checkpoints in {ckpt.directory} can be restored "
              f"({_few(list(skipped), 3, sep='; ')})")
    return _refuse_unless_restart(reason, config, _RESTART)


def _refuse_unless_restart(reason: str | None, config, hint: str) -> str | None:
    if reason and not config.train.restart:
        raise ValueError(f"{reason[0].upper()}{reason[1:]}; {hint}.")
    return reason


def _difference(saved: dict, built: dict) -> str | None:
    only_saved = sorted(saved.keys() - built.keys())
    only_built = sorted(built.keys() - saved.keys())
    reshaped = sorted(f"{k} {saved[k]} vs {built[k]}" for k in saved.keys() & built.keys()
                      if saved[k] != built[k])
    parts = [f"{label}: {_few(items)}" for label, items in (
        ("saved, not built", only_saved), ("built, not saved", only_built),
        ("saved vs built shape", reshaped)) if items]
    return "; ".join(parts) or None


def config_changes(saved: dict | None, config) -> str:
    """"optim.clip_norm 1.0 -> 0.0, ..." for the fields that differ (train.restart aside)."""
    if not saved:
        return ""
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(config.to_dict())))  # as saved
    keys = sorted(k for k in old.keys() | new.keys()
                  if k != "train.restart" and old.get(k) != new.get(k))
    return _few([f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys], 6)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _few(items: list, n: int = 2, sep: str = ", ") -> str:
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def replay(data_iter, step: int, problem: str) -> None:
    """Brings a fresh iterator to the position of `step` by drawing the `step` batches the run
    drew before it (one per step). Exact: the pipeline is a deterministic function of the data
    config (llama_jax.data), so the batches after it are those the run would have seen."""
    logging.warning("Checkpoint step %d: its data-iterator state cannot be restored (%s); its "
                    "weights are restored and the data position is recovered by replaying the "
                    "%d batches before it.", step, problem, step)
    t = time.perf_counter()
    for _ in range(step):
        next(data_iter)
    if jax.process_index() == 0:
        print(f"Replayed {step} batches in {time.perf_counter() - t:.1f}s.", flush=True)
