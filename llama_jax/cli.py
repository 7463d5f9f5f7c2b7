"""How the launchers and tools end: a plain mistake is one `error: ...` line and exit code 2.

    if __name__ == "__main__":
        cli.run(main)             # an absl app: its flags and config file included
        sys.exit(cli.call(main))  # any other entry point (argparse: cli.ArgumentParser)

Plain mistakes: a flag that does not parse (unknown flag, bad value, missing required flag), a
config file that does not exist or whose get_config(arg) refuses the arg, a `--config.x.y`
override of a field the config lacks, and the checks of this repository's own code — a
ValueError, FileNotFoundError, FileExistsError, TimeoutError or FloatingPointError (a run that
diverged: train.max_bad_steps non-finite steps in a row) raised in llama_jax/, experiments/,
tools/ or data/. Anything else (an exception raised inside JAX, Orbax or NumPy,
another type) is a bug and keeps its traceback. Ctrl-C ends with one line and exit code 130;
with `unwind_on_sigterm`, SIGTERM unwinds the stack like Ctrl-C (so `finally` blocks remove
temporary outputs) and ends with exit code 143.

Every entry point also shows each repeated log record and each repeated exception that Python
reports from a thread or a finaliser only once (`show_each_once`): after one unreadable
checkpoint Orbax's readers otherwise leave one asyncio traceback per array.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from absl import app, flags
from ml_collections.config_flags import config_flags

PLAIN = (ValueError, FileNotFoundError, FileExistsError, TimeoutError, FloatingPointError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = (_PACKAGE, *(os.path.join(os.path.dirname(_PACKAGE), d)
                         for d in ("experiments", "tools", "data")))


class Terminated(BaseException):
    """Raised by the SIGTERM handler of `unwind_on_sigterm`; a BaseException, so that no
    `except Exception` on the way swallows it."""


def fail(message: str, code: int = 2):
    """Ends the process with `error: message` (on one line) on stderr."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    sys.exit(code)


def run(main, *, unwind_on_sigterm: bool = False) -> None:
    """absl's app.run(main), with flag and config mistakes and plain errors as one line."""
    app.run(lambda argv: call(main, argv, unwind_on_sigterm=unwind_on_sigterm),
            flags_parser=_parse_flags)


def call(fn, *args, unwind_on_sigterm: bool = False):
    """fn(*args), ending a plain mistake, Ctrl-C or (optionally) SIGTERM with one line."""
    show_each_once()
    if unwind_on_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn(*args)
    except PLAIN as e:
        if not raised_by_own_code(e):
            raise
        fail(str(e))
    except app.UsageError as e:  # absl's own kind of plain mistake
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C).", 130)
    except Terminated:
        fail("terminated (SIGTERM).", 143)


def raised_by_own_code(e: BaseException) -> bool:
    """True if the innermost frame of `e`'s traceback is in this repository's code."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return any(path.startswith(d + os.sep) for d in _OWN_DIRS)


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise Terminated()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its mistakes ending in one `error:` line (argparse's own prints the
    usage first)."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help).")


# ----------------------------------------------------------------------------------------------
# absl flags and ml_collections config files


def _parse_flags(argv):
    try:
        rest = flags.FLAGS(argv)
        _check_config_files()
        return rest
    except flags.Error as e:
        fail(_flag_error(e))
    except OSError as e:  # a config file that did not load, met by an override's type lookup
        fail(_config_file_error(e, argv))
    except (AttributeError, KeyError) as e:
        message = _unknown_override(e, argv)
        if message is None:
            raise  # not an override's field: a bug in the config file, with its traceback
        fail(message)


def _config_flags():
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if config_flags.is_config_flag(flag) and flag.name == name:
            yield flag


def _check_config_files() -> None:
    """ml_collections defers a config file's load error to the first use of the config; meet
    it now, while the mistake is still one line."""
    for flag in _config_flags():
        if flag.value is not None:
            getattr(flag.value, "keys")  # OSError if the file did not load


def _config_file_error(e: OSError, argv) -> str:
    """A config file that does not exist named by its flag; else the error's last line."""
    for flag in _config_flags():
        for i, arg in enumerate(argv[1:], 1):  # --config=PATH[:arg] or --config PATH[:arg]
            name, eq, value = arg.lstrip("-").partition("=")
            if name != flag.name or not (eq or i + 1 < len(argv)):
                continue
            path = (value if eq else argv[i + 1]).split(":", 1)[0]
            if not os.path.isfile(path):
                return (f"--{flag.name}: the config file {path} does not exist; pass an "
                        f"existing file, e.g. experiments/configs/tiny.py.")
    text = str(e).strip()
    return f"cannot load the config: {text.splitlines()[-1].strip() if text else repr(e)}"


def _flag_error(e: flags.Error) -> str:
    """absl's message; for a get_config(arg) that raised ValueError, that error's last line
    (ml_collections puts the whole traceback in the message)."""
    text = str(e)
    if "Error whilst parsing config file" not in text:
        return text
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    if not last.startswith("ValueError: "):
        sys.stderr.write(text + "\n")  # a bug in the config file: keep its traceback
        sys.exit(1)
    return f"{text.split(':', 1)[0]}: {last[len('ValueError: '):]}"


def _unknown_override(e: BaseException, argv) -> str | None:
    """The one-line message for `--config.a.b=v` naming a field the config lacks, from
    ml_collections' KeyError "'b'\\nDid you mean ...?" (inside an AttributeError)."""
    while isinstance(e, AttributeError) and e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    text = str(e.args[0]) if e.args else ""
    lines = text.split("\n")
    key = lines[0].strip("'\" ")
    for flag in _config_flags():
        for arg in argv[1:]:
            name = arg.lstrip("-").split("=", 1)[0]
            if name.startswith(flag.name + ".") and key in name.split(".")[1:]:
                hint = (lines[1].strip()[:1].lower() + lines[1].strip()[1:] if len(lines) > 1
                        else "check the name against the config file.")
                return f"--{name}: the config has no field {key!r}; {hint}"
    return None


# ----------------------------------------------------------------------------------------------
# Each repeated warning once


class _Once(logging.Filter):
    """A handler's filter: passes a record unless one with the same logger, level and first
    line has passed. asyncio's reports of failed tasks are cut to their first line and the
    exception's (the key stays that of the uncut record, for every handler)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "once_key", None)
        if key is None:
            first = record.getMessage().split("\n", 1)[0]
            key = record.once_key = (record.name, record.levelno, first)
            if record.name == "asyncio" and record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                detail = str(exc).strip().split("\n", 1)[0][:300]
                record.msg, record.args = f"{first} ({type(exc).__name__}: {detail})", ()
                record.exc_info = record.exc_text = None
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def show_each_once() -> None:
    """Installs `_Once` on the root logger's handlers (and Python's last-resort one), and hooks
    that report each distinct exception raised in a thread or a finaliser once."""
    for handler in (*logging.getLogger().handlers, logging.lastResort):
        if handler is not None and not any(isinstance(f, _Once) for f in handler.filters):
            handler.addFilter(_Once())
    if getattr(sys.unraisablehook, "_once", False):
        return
    seen = set()

    def once(hook):
        def wrapped(args):
            key = (args.exc_type, str(args.exc_value))
            if key not in seen:
                seen.add(key)
                hook(args)
        wrapped._once = True
        return wrapped

    sys.unraisablehook = once(sys.unraisablehook)
    threading.excepthook = once(threading.excepthook)
