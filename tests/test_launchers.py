"""Launchers and tools (llama_jax/cli.py): a plain mistake ends in one `error:` line on stderr
and exit code 2, with no traceback and nothing written; a bug keeps its traceback; repeated
warnings show once. And the README's train-then-decode pair works as written."""

import logging
import os
import re
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest

from llama_jax import cli, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/configs/tiny.py"


@pytest.fixture(autouse=True)
def _undo_show_each_once(monkeypatch):
    """cli.call installs process-wide hooks and log filters; take them out of pytest's again."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield
    for handler in (*logging.getLogger().handlers, logging.lastResort):
        for f in [f for f in handler.filters if isinstance(f, cli._Once)]:
            handler.removeFilter(f)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device: faster start-up
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=timeout)


def _run_all(commands):
    """Runs the commands side by side (each mostly imports) and returns their results."""
    procs = [subprocess.Popen([sys.executable, *c], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
             for c in commands]
    for p in procs:
        p.communicate(timeout=300)
    return [subprocess.CompletedProcess(p.args, p.returncode, *p.communicate()) for p in procs]


def _assert_one_line(r, *words):
    assert r.returncode == 2, (r.args, r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


TRAIN_MISTAKES = [  # (arguments, words of the one line), one per way the parsing can fail
    (["--config=experiments/configs/nope.py"], ["experiments/configs/nope.py", "does not exist"]),
    (["--config=experiments/configs/nope.py", "--config.train.steps=3"], ["nope.py"]),
    ([f"--config={TINY}", "--config.train.step=1"],
     ["--config.train.step", "no field 'step'", 'did you mean "steps"']),
    ([f"--config={TINY}", "--config.train.steps=abc"], ["--config.train.steps=abc"]),
    ([f"--config={TINY}:bad"], ["Unknown tiny.py argument 'bad'"]),
    ([f"--config={TINY}", "--config.data.seq_len=100000"], ["exceeds the model's max_seq_len"]),
]


def test_train_plain_mistakes(tmp_path):
    """A missing config file (alone, and with an override), an unknown and a mistyped
    override, get_config refusing its arg, and a check of llama_jax.train: one line each,
    and no workdir."""
    runs = _run_all([["experiments/train.py", *args, f"--workdir={tmp_path / str(i)}"]
                     for i, (args, _) in enumerate(TRAIN_MISTAKES)])
    for r, (_, words) in zip(runs, TRAIN_MISTAKES):
        _assert_one_line(r, *words)
    assert not os.listdir(tmp_path)


def test_decode_and_tools_plain_mistakes(tmp_path):
    runs = _run_all([
        ["experiments/decode.py", f"--checkpoint={tmp_path / 'nope'}", "--prompt=x"],
        ["tools/convert_checkpoint.py", f"--input={tmp_path / 'nope'}",
         f"--output={tmp_path / 'out'}", "--to=hf"],
        ["tools/plan.py", "--config=experiments/configs/nope.py", "--target=cpu:8"],
        ["tools/train_tokenizer.py", f"--output={tmp_path / 'tok'}", "--vocab_size=100"]])
    _assert_one_line(runs[0], str(tmp_path / "nope"), "does not exist")
    _assert_one_line(runs[1], str(tmp_path / "nope"), "does not exist")
    _assert_one_line(runs[2], "nope.py does not exist", "plan.py --help")  # argparse's error
    _assert_one_line(runs[3], "vocab_size 100")
    assert not os.listdir(tmp_path)


def test_a_bug_keeps_its_traceback(capsys):
    """Only this repository's own checks are plain mistakes: a ValueError raised inside NumPy
    propagates (with its traceback); one raised by llama_jax exits 2 with one line."""
    with pytest.raises(ValueError, match="negative dimensions"):
        cli.call(lambda: np.zeros(-1))
    with pytest.raises(SystemExit) as e:
        cli.call(tokenizer.load_tokenizer, "/nonexistent/tokenizer.model")
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: No tokenizer file at /nonexistent/tokenizer.model: pass a tokenizer.model path "
        "or 'byte'.\n")


def test_each_repeated_warning_shows_once():
    """Repeated records (a NaN warning per step, asyncio's report of each failed read of an
    unreadable checkpoint) and repeated exceptions in threads show once; asyncio's reports
    lose their multi-line traceback."""
    records, hooked = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    root = logging.getLogger()
    root.addHandler(handler)
    threading.excepthook = sys.unraisablehook = hooked.append  # the fixture puts them back
    try:
        cli.show_each_once()
        for step in range(3):
            logging.getLogger("tensorboardX.x2num").warning("NaN or Inf found in input tensor.")
            logging.getLogger("llama_jax.train").warning("Step %d: non-finite loss", step)
            try:
                raise RuntimeError(f"Encountered error while reading array {step}\n  {{spec}}")
            except RuntimeError as e:
                logging.getLogger("asyncio").error(
                    f"Task exception was never retrieved\nfuture: <Task {step}>", exc_info=e)
        for _ in range(3):
            t = threading.Thread(target=lambda: 1 / 0)
            t.start()
            t.join()
    finally:
        root.removeHandler(handler)
    assert records.count("NaN or Inf found in input tensor.") == 1
    assert sum(r.startswith("Step ") for r in records) == 3  # different messages all show
    asyncio_lines = [r for r in records if r.startswith("Task exception")]
    assert asyncio_lines == ["Task exception was never retrieved (RuntimeError: Encountered "
                             "error while reading array 0)"]
    assert len(hooked) == 1 and hooked[0].exc_type is ZeroDivisionError


def _readme_commands():
    """The quick start's training command and the decode example that reads its export."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    train_cmd = re.search(r"(experiments/train\.py --config=\S+tiny\.py "
                          r"--workdir=/tmp/llama_tiny)[`\s]", text).group(1)
    decode_cmd = re.search(r"(experiments/decode\.py --checkpoint=/tmp/llama_tiny/export "
                           r"[^`\n]*)", text).group(1)
    return shlex.split(train_cmd), shlex.split(decode_cmd)


@pytest.mark.slow
def test_readme_train_then_decode(tmp_path):
    """The README's pair as written, on the test-sized tiny config (in a temporary workdir,
    its cache widened to the example's 64 new tokens): a byte-level run's export records its
    tokenizer, so the decode command finds it."""
    train_cmd, decode_cmd = _readme_commands()
    workdir = str(tmp_path / "llama_tiny")
    train_cmd = [a.replace("/tmp/llama_tiny", workdir) for a in train_cmd]
    train_cmd = [a + ":test" if a.endswith("tiny.py") else a for a in train_cmd]
    r = _run(*train_cmd, "--config.model.max_seq_len=128", "--config.train.steps=20",
             "--config.train.sample_tokens=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(*[a.replace("/tmp/llama_tiny", workdir) for a in decode_cmd])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip("\n") != "" and "error" not in r.stderr
    byte = _run("experiments/decode.py", f"--checkpoint={workdir}/export", "--prompt=def ",
                "--max_new_tokens=4", "--tokenizer=byte", "--format=json")
    assert byte.returncode == 0 and '"ids"' in byte.stdout, byte.stderr[-3000:]
    wrong = _run("experiments/decode.py", f"--checkpoint={workdir}/export", "--prompt=def ",
                 f"--tokenizer={tmp_path}/nope.model")
    _assert_one_line(wrong, f"--tokenizer={tmp_path}/nope.model")
    assert workdir + "/export" not in wrong.stderr  # the tokenizer is at fault, not the checkpoint
