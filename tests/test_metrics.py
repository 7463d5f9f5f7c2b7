"""MetricsWriter: metrics.jsonl records, throughput between log steps, the console line; the
clock starts at the end of the first step, whose time is mostly compiling."""

import itertools
import json
import os
import sys
import time

import jax
import numpy as np
import pytest

from llama_jax import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the config files import experiments.configs.common

from experiments.configs import tiny  # noqa: E402

FLOPS_PER_TOKEN, PEAK = 6e9, 2.0  # TFLOP/s per device


@pytest.fixture
def writer(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=100, start_step=0,
                              flops_per_token=FLOPS_PER_TOKEN, peak_tflops=PEAK)
    yield w
    w.close()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_throughput_between_log_steps(writer, tmp_path, capsys):
    """10 steps of 1,000 tokens in 2 s: 5,000 tok/s; TFLOP/s per device and MFU follow from
    the FLOPs per token, the device count and the peak; an eval's seconds are left out."""
    writer.last_time = time.perf_counter() - 2.0  # the 10 steps took 2 s
    out = writer.train(10, {"loss": 2.5, "grad_norm": 0.75, "lr": 1e-3}, tokens_per_step=1000)
    assert out["tokens_per_s"] == pytest.approx(5000, rel=0.02)
    assert out["step_s"] == pytest.approx(0.2, rel=0.02)
    tflops = out["tokens_per_s"] * FLOPS_PER_TOKEN / jax.device_count() / 1e12
    assert out["tflops_per_device"] == pytest.approx(tflops)
    assert out["mfu"] == pytest.approx(tflops / PEAK)

    writer.last_time -= 4.0  # since: 3 s of eval, then 1 s of training
    writer.eval(10, {"eval_loss": 2.75}, seconds=3.0)
    out = writer.train(20, {"loss": 2.0, "grad_norm": 0.5, "lr": 1e-3}, tokens_per_step=1000)
    assert out["tokens_per_s"] == pytest.approx(10000, rel=0.05)

    records = _records(tmp_path)
    assert [r["step"] for r in records] == [10, 10, 20]
    assert records[0]["loss"] == 2.5 and records[1] == {"step": 10, "eval_loss": 2.75}
    assert set(records[2]) >= {"loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_s"}
    assert os.listdir(tmp_path / "tensorboard")  # an event file

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step  10/100 [##------------------]  10% | loss 2.5000 | ")
    assert "eta 0m18s" in lines[0] and "MFU" in lines[0]  # 90 steps left at 0.2 s
    assert lines[1] == "step     10 | eval_loss 2.7500"


def test_first_log_has_no_throughput_and_a_skipped_step_says_so(writer, capsys):
    out = writer.train(0, {"loss": 9.0, "grad_norm": 1.0, "lr": 0.0, "skipped": 1.0,
                           "bad_streak": 2}, tokens_per_step=1000)
    assert "tokens_per_s" not in out  # no step since the start
    line = capsys.readouterr().out
    assert "tok/s" not in line and "SKIPPED non-finite (streak 2)" in line


def test_records_append_across_writers(tmp_path):
    """A resumed run opens the same workdir: earlier records stay."""
    for start in (0, 5):
        w = metrics.MetricsWriter(str(tmp_path), total_steps=10, start_step=start,
                                  flops_per_token=1.0, peak_tflops=0.0)
        w.train(start + 5, {"loss": 1.0, "grad_norm": 1.0, "lr": 1.0}, tokens_per_step=1)
        w.close()
    assert [r["step"] for r in _records(tmp_path)] == [5, 10]
    assert _records(tmp_path)[0]["mfu"] == 0.0  # peak unknown


COMPILE_S, STEP_S = 1.0, 0.01


def _new_writer(workdir, total=20):
    return metrics.MetricsWriter(str(workdir), total_steps=total, start_step=0,
                                 flops_per_token=1e6, peak_tflops=1.0)


def test_rate_starts_at_the_end_of_the_first_step(tmp_path, monkeypatch):
    clock = iter([0.0, COMPILE_S, COMPILE_S + 9 * STEP_S])  # created, step 1 done, step 10
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    writer = _new_writer(tmp_path)
    writer.start_clock(1)
    v = writer.train(10, dict(loss=1.0, grad_norm=1.0, lr=1e-3), tokens_per_step=100)
    np.testing.assert_allclose(v["step_s"], STEP_S)
    np.testing.assert_allclose(v["tokens_per_s"], 100 / STEP_S)
    writer.close()


def test_loop_starts_the_clock_after_the_compiling_step(tmp_path, capsys):
    """The real loop with a step that takes COMPILE_S the first time: the first logged rate
    and ETA are those of the later steps."""
    config = tiny.get_config("test")
    with config.unlocked():
        config.train.update(steps=20, log_every=10, eval_every=0)
    calls = itertools.count()

    def step_fn(state, batch):
        time.sleep(COMPILE_S if next(calls) == 0 else STEP_S)
        return state, dict(loss=np.float32(1), grad_norm=np.float32(1), lr=np.float32(1e-3),
                           tokens=np.float32(1), skipped=np.int32(0), bad_streak=np.int32(0))

    class Checkpoints:
        def save(self, *args, **kwargs):
            return False

    writer = _new_writer(tmp_path)
    train._loop(config, None, step_fn, Checkpoints(), itertools.repeat({}), lambda x: x, writer,
                None, 0)
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 10
    assert first["step_s"] < 5 * STEP_S, first  # compiling counted in: > COMPILE_S / 10
    assert "eta 0m00s" in capsys.readouterr().out.splitlines()[0]
