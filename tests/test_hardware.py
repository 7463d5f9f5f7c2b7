"""llama_jax.hardware's start-up guard: a host without a TPU hears nothing from libtpu."""

import os
import subprocess
import sys

import jax
import pytest

from llama_jax import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bare_linux_host_with_libtpu(monkeypatch):
    """No JAX_PLATFORMS, no accelerator device files, libtpu importable, platforms unset. This
    process's backends have started already, so jax_platforms is only a setting here."""
    chosen = jax.config.jax_platforms
    jax.config.update("jax_platforms", None)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: object())
    yield
    jax.config.update("jax_platforms", chosen)


def test_bare_host_with_libtpu_is_kept_to_the_cpu(bare_linux_host_with_libtpu):
    assert hardware.skip_absent_tpu() and jax.config.jax_platforms == "cpu"


@pytest.mark.parametrize("change", ["env", "device", "no_libtpu", "chosen"])
def test_anything_else_is_left_to_jax(bare_linux_host_with_libtpu, monkeypatch, change):
    if change == "env":
        monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    elif change == "device":  # e.g. a v5e host's /dev/vfio/0
        monkeypatch.setattr(hardware.glob, "glob",
                            lambda p: ["/dev/vfio/0"] if "vfio" in p else [])
    elif change == "no_libtpu":
        monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    else:  # chosen in code before llama_jax was imported
        jax.config.update("jax_platforms", "cuda")
    assert not hardware.skip_absent_tpu()
    assert jax.config.jax_platforms == ("cuda" if change == "chosen" else None)


def test_starting_jax_through_llama_jax_prints_nothing():
    """The first screen of every command: importing llama_jax and starting a backend, with
    JAX left to choose its platforms as a user's shell does."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", "import llama_jax, jax; jax.devices()"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == ""
    if not any(hardware.glob.glob(p) for p in hardware.ACCELERATOR_FILES):  # no TPU here
        assert "host bounds" not in out.stderr and "INVALID_ARGUMENT" not in out.stderr, \
            out.stderr
