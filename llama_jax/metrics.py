"""Training metrics: TensorBoard event files, `metrics.jsonl` and one console line per log step.

    writer = MetricsWriter(workdir, total_steps=1000, start_step=0, flops_per_token=...,
                           peak_tflops=...)
    writer.train(step, {"loss": ..., "grad_norm": ..., "lr": ...}, tokens_per_step=B * T)
    writer.eval(step, {"eval_loss": ...}, seconds=...)   # seconds: left out of throughput

Throughput is measured between consecutive `train` calls, so it includes the input pipeline
and any host work: what a user waits for, not a kernel benchmark. The clock starts at the end of
the run's first step (`start_clock`), whose time is mostly compiling: counted in, it made the
first ETA many times too long. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time

import jax
from tensorboardX import SummaryWriter

from llama_jax import flops


class MetricsWriter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int,
                 flops_per_token: float, peak_tflops: float):
        self.enabled = jax.process_index() == 0
        self.total, self.flops_per_token, self.peak = total_steps, flops_per_token, peak_tflops
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.t0 = self.last_time  # the console's elapsed time: compiling included
        if self.enabled:
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def start_clock(self, step: int) -> None:
        """Measures throughput from now on: the end of `step`, the run's first (it compiled)."""
        self.last_step, self.last_time = step, time.perf_counter()

    def train(self, step: int, values: dict, *, tokens_per_step: int) -> dict:
        """Adds throughput, TFLOP/s per device and MFU to `values`, writes and prints them."""
        now = time.perf_counter()
        dt, steps = now - self.last_time, step - self.last_step
        self.last_step, self.last_time = step, now
        values = {k: float(v) for k, v in values.items()}
        if steps > 0 and dt > 0:
            tok_s = steps * tokens_per_step / dt
            values["tokens_per_s"] = tok_s
            values["tflops_per_device"] = flops.tflops_per_device(
                tok_s, self.flops_per_token, jax.device_count())
            values["mfu"] = flops.mfu(tok_s, self.flops_per_token, jax.device_count(), self.peak)
            values["step_s"] = dt / steps
        self._write(step, values)
        if self.enabled:
            print(self._line(step, values, now - self.t0), flush=True)
        return values

    def eval(self, step: int, values: dict, *, seconds: float = 0.0) -> None:
        """Writes eval metrics; `seconds` spent evaluating are left out of training throughput."""
        self.last_time += seconds
        values = {k: float(v) for k, v in values.items()}
        self._write(step, values)
        if self.enabled:
            print(f"step {step:>6d} | " + " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                  flush=True)

    def _write(self, step, values):
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def _line(self, step, v, elapsed) -> str:
        """`step 120/1000 [###-------] 12% | loss 3.214 | ... | eta 4m10s`."""
        frac = min(step / max(self.total, 1), 1.0)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        parts = [f"step {step:>{len(str(self.total))}d}/{self.total} [{bar}] {frac:4.0%}",
                 f"loss {v['loss']:.4f}", f"gnorm {v['grad_norm']:.3f}", f"lr {v['lr']:.2e}"]
        if "tokens_per_s" in v:
            eta = (self.total - step) * v["step_s"]
            parts += [f"{v['tokens_per_s']:,.0f} tok/s",
                      f"{v['tflops_per_device'] * 1e3:.1f} GFLOP/s/dev",
                      f"MFU {v['mfu']:.1%}" if self.peak > 0 else "MFU n/a",
                      f"{elapsed:.0f}s eta {int(eta // 60)}m{int(eta % 60):02d}s"]
        if v.get("skipped"):
            parts.append(f"SKIPPED non-finite (streak {int(v['bad_streak'])})")
        return " | ".join(parts)

    def close(self):
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
