"""tools/convert_checkpoint.py leaves nothing behind: SIGTERM and Ctrl-C mid-write remove the
temporary folder, the next conversion removes one a SIGKILL left, outputs get the umask's
permissions (not mkdtemp's 0700)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llama_jax
from llama_jax import config as config_lib
from llama_jax import hf, safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An 84 MB f32 Hugging Face checkpoint: its Meta conversion writes for about 2 s, long
    enough to be interrupted once the temporary folder appears."""
    d = str(tmp_path_factory.mktemp("src") / "hf")
    c = llama_jax.ModelConfig(vocab_size=4096, dim=512, n_layers=4, n_heads=4, n_kv_heads=4,
                              ffn_dim=2048)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_lib.to_hf_config(c), f)
    specs = {n: (hf.tensor_shape(c, n), np.dtype(np.float32)) for n in hf.tensor_names(c)}
    safetensors_io.write(os.path.join(d, "model.safetensors"), specs,
                         lambda n: np.full(specs[n][0], 0.01, np.float32))
    return d


def _start(src, dst, to):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, CONVERT, f"--input={src}", f"--output={dst}",
                             f"--to={to}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _leftovers(parent, name):
    """Temporary folders of output `name`: `.tmp-name-*` (Meta, HF) or `name.tmp` (Orbax)."""
    return sorted(n for n in os.listdir(parent)
                  if n.startswith(f".tmp-{name}-") or n == f"{name}.tmp")


def _interrupt_once_writing(src, dst, to, sig, tries=3):
    """Starts a conversion and sends `sig` as soon as its temporary folder exists. On a loaded
    machine the test can lose the race (the conversion completes before the signal lands):
    then the output is removed and it tries again."""
    parent, name = os.path.split(dst)
    for _ in range(tries):
        proc = _start(src, dst, to)
        while proc.poll() is None and not _leftovers(parent, name):
            time.sleep(0.001)
        assert proc.poll() is None, "the conversion ended before its temporary folder was seen"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            return proc.returncode, err
        shutil.rmtree(dst)
    raise AssertionError(f"{tries} conversions completed before the signal landed")


@pytest.mark.parametrize("to, sig, code, line", [
    ("meta", signal.SIGTERM, 143, "error: terminated (SIGTERM)."),
    ("orbax", signal.SIGTERM, 143, "error: terminated (SIGTERM)."),
    ("meta", signal.SIGINT, 130, "error: interrupted (Ctrl-C)."),
])
def test_interrupted_conversion_removes_its_temporary_folder(hf_dir, tmp_path, to, sig, code,
                                                              line):
    dst = str(tmp_path / "out")
    rc, err = _interrupt_once_writing(hf_dir, dst, to, sig)
    assert rc == code, err[-2000:]
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert _leftovers(str(tmp_path), "out") == [] and not os.path.exists(dst)


def test_next_conversion_removes_what_a_killed_one_left(hf_dir, tmp_path):
    dst = str(tmp_path / "out")
    rc, _ = _interrupt_once_writing(hf_dir, dst, "meta", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    killed = _leftovers(str(tmp_path), "out")
    assert len(killed) == 1
    # a folder of a conversion still running (this process) is not touched
    live = f".tmp-out-{os.uname().nodename}-{os.getpid()}-0123abcd"
    os.mkdir(tmp_path / live)
    proc = _start(hf_dir, dst, "hf")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    removed = [line for line in err.splitlines() if "Removing" in line]
    assert len(removed) == 1 and killed[0] in removed[0], err
    assert _leftovers(str(tmp_path), "out") == [live]
    assert os.path.isfile(os.path.join(dst, "model.safetensors"))


def test_outputs_get_the_umask_permissions(hf_dir, tmp_path):
    from tools import convert_checkpoint  # not tools/ on sys.path: tools/lm_eval.py would hide lm_eval

    umask = os.umask(0)
    os.umask(umask)
    for to in ("hf", "meta", "orbax"):
        out = convert_checkpoint.convert(hf_dir, str(tmp_path / to), to=to)
        assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask, to
        for base, dirs, _ in os.walk(out):
            for d in dirs:
                assert os.stat(os.path.join(base, d)).st_mode & 0o777 == 0o777 & ~umask, d


def test_orbax_output_left_by_a_killed_export_is_removed_with_a_warning(hf_dir, tmp_path,
                                                                        caplog):
    from tools import convert_checkpoint  # not tools/ on sys.path: tools/lm_eval.py would hide lm_eval

    os.makedirs(tmp_path / "out.tmp" / "params")  # what a SIGKILLed Orbax conversion leaves
    with caplog.at_level("WARNING"):
        convert_checkpoint.convert(hf_dir, str(tmp_path / "out"), to="orbax")
    assert f"Removing {tmp_path / 'out.tmp'}, left by an export that was killed." in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["out"]
