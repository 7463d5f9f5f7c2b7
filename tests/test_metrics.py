"""MetricsWriter: metrics.jsonl records, throughput between log steps, the console line."""

import json
import os
import time

import jax
import pytest

from llama_jax import metrics

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
