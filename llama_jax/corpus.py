"""The default corpus: documents from local text or JSONL files, as a TFDS dataset in array_record.

Each record is one document, `{"text": bytes}` (UTF-8). A plain text file is one document; a
`.jsonl`/`.json` file holds one JSON object per line and the document is its `jsonl_field`
(with jsonl_field "", the whole line: chat_data's conversations, parsed and checked there).
Documents that are empty or whitespace are left out. With no glob the corpus is the Python
standard library's own `.py` sources (no tests, no site-packages): about 600 files, 11 MB, on
any machine without a download.

Building needs no TensorFlow: TFDS's `GeneratorBasedBuilder` writes `array_record` shards with
pure-Python writers when `file_format="array_record"` (tensorflow_datasets 4.9). TFDS writes
into `<data_dir>/text_files/<config>/incomplete.XXXX_1.0.0/` and renames the folder only when
every split is written, so a half-built dataset is never visible to readers.

A build is named by what it holds: `<name>_<inputs>_<files>`, where <inputs> hashes the glob,
the JSONL field and the validation fraction, and <files> the matched files' paths, sizes and
modification times. Editing, adding or removing a file therefore builds afresh (with one line
saying so) instead of serving the old documents; earlier builds stay where they are.

Splits are assigned by a hash of the document's key (path relative to the corpus root, plus the
line number for JSONL), so the `validation` split is the same on every machine and every build.

Build by hand (llama_jax.data builds on first use as well):
    python -m llama_jax.corpus --files='corpus/*.jsonl' --name=web --data_dir=/tmp/tfds
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "llama_jax", "tfds")
# Test suites and vendored packages are not the library's own prose; leaving them out keeps the
# default corpus small (600 files) and typical of hand-written code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """files: glob ("" = the standard library); jsonl_field: the text field of JSONL records."""
    files: str = ""
    jsonl_field: str = "text"
    validation_fraction: float = 0.02


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value).encode()).hexdigest()[:8]


def make_config(name: str = "stdlib", files: str = "", jsonl_field: str = "text",
                validation_fraction: float = 0.02) -> TextFilesConfig:
    """The config of the corpus as its files are now: its TFDS name changes with the glob, the
    options, and the paths, sizes and modification times of the matched files."""
    if not name.isidentifier():
        raise ValueError(f"dataset name {name!r} must be a Python identifier, e.g. 'my_corpus'.")
    inputs = _digest([os.path.abspath(files) if files else "", jsonl_field, validation_fraction])
    paths = corpus_files(files)
    return TextFilesConfig(name=f"{name}_{inputs}_{files_digest(paths, corpus_root(files))}",
                           version="1.0.0", files=files, jsonl_field=jsonl_field,
                           validation_fraction=validation_fraction,
                           description=f"documents from {files or 'the Python stdlib'}")


def files_digest(paths: list[str], root: str) -> str:
    """A hash of each file's path (relative to root), size and modification time."""
    stats = [(os.path.relpath(p, root), s.st_size, s.st_mtime_ns)
             for p, s in ((p, os.stat(p)) for p in paths)]
    return _digest(stats)


def corpus_root(files: str) -> str:
    """The folder that document keys are relative to: the glob's prefix before any wildcard."""
    if not files:
        return sysconfig.get_paths()["stdlib"]
    parts = os.path.abspath(os.path.expanduser(files)).split(os.sep)
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
    return os.sep.join(fixed[:-1] if len(fixed) == len(parts) else fixed) or os.sep


def corpus_files(files: str) -> list[str]:
    """The sorted file list of a corpus; raises on an empty match, an unreadable file, or files
    that are all empty."""
    if files:
        paths = sorted(p for p in glob.glob(os.path.expanduser(files), recursive=True)
                       if os.path.isfile(p))
    else:
        root = corpus_root("")
        paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                       if not _STDLIB_SKIP & set(os.path.relpath(p, root).split(os.sep)))
    if not paths:
        raise ValueError(f"the glob {files!r} matches no files; check the path (use ** with "
                         f"quotes for recursive matches).")
    for p in paths:
        if not os.access(p, os.R_OK):
            raise PermissionError(f"cannot read {p}; fix its permissions or leave it out of "
                                  f"the glob.")
    if not any(os.path.getsize(p) for p in paths):
        raise ValueError(f"the {len(paths)} file(s) matched by {files!r} are all empty; point "
                         f"data.files at files that hold text.")
    return paths


def key_hash(key: str) -> float:
    """The first 8 bytes of SHA-1(key) as a fraction in [0, 1): the split of a document."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def split_documents(docs, fraction: float, validation: bool):
    """The documents of one split: key_hash < fraction goes to validation. When no document
    qualifies (a tiny corpus), the smallest-hash one does, so neither split is ever empty. One
    pass, O(1) memory: the smallest-hash train candidate is held back until the end."""
    held, any_val = None, False  # held: (hash, key, text)
    for key, text in docs:
        h = key_hash(key)
        if h < fraction:
            any_val = True
            if validation:
                yield key, text
        elif held is None or h < held[0]:
            if held is not None and not validation:
                yield held[1], held[2]
            held = (h, key, text)
        elif not validation:
            yield key, text
    if held is not None and any_val != validation:
        yield held[1], held[2]


def read_documents(path: str, root: str, jsonl_field: str) -> Iterator[tuple[str, str]]:
    """(key, text) for each document of one file that holds more than whitespace. Invalid
    UTF-8 becomes U+FFFD rather than failing a whole build on one stray byte."""
    rel = os.path.relpath(path, root)
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith((".jsonl", ".json")):
            text = f.read()
            if text.strip():
                yield rel, text
            return
        for i, line in enumerate(f):
            if not line.strip():
                continue
            if not jsonl_field:  # "": the whole line, parsed by its reader (llama_jax.chat_data)
                yield f"{rel}:{i + 1}", line.strip()
                continue
            try:
                text = json.loads(line)[jsonl_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i + 1} is not a JSON object with a string field "
                                 f"{jsonl_field!r} ({e}); fix the line or set jsonl_field.")
            if text.strip():
                yield f"{rel}:{i + 1}", text


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Documents from local files; configure with `config=make_config(...)`."""

    VERSION = tfds.core.Version("1.0.0")
    # No registered configs: every corpus gets its own `make_config(...)`, passed as `config=`
    # (TFDS refuses a custom config that shares a registered config's name).
    BUILDER_CONFIGS: list[TextFilesConfig] = []
    # TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`, a backport it
    # does not install on Python >= 3.9; giving the path outright skips that lookup.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.builder_config.description,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    # TFDS announces "Downloading and preparing dataset" and where it went; nothing is
    # downloaded here, and `prepare` prints one line of its own instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        c = self.builder_config
        paths, root = corpus_files(c.files), corpus_root(c.files)
        return {"train": self._generate_examples(paths, root, False),
                "validation": self._generate_examples(paths, root, True)}

    def _generate_examples(self, paths, root, validation: bool):
        c = self.builder_config
        docs = (doc for path in paths for doc in read_documents(path, root, c.jsonl_field))
        count = 0
        for count, (key, text) in enumerate(
                split_documents(docs, c.validation_fraction, validation), 1):
            yield key, {"text": text}
        if not count:
            raise ValueError(f"the corpus {c.files or 'stdlib'!r} has fewer than two documents "
                             f"with text; give at least two so both train and validation have "
                             f"one.")


class _DropNotices(logging.Filter):
    """TFDS warns "Using custom data configuration" for every builder of a config it does not
    register (all of ours, by design) and "Variant folder ... has no dataset_info.json" for a
    build that has not happened yet; neither is news here."""

    NOTICES = ("Using custom data configuration", "Variant folder")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS without its notices, and without progress bars unless stderr is a terminal (where
    they redraw in place; in a log each redraw is a line)."""
    notices, logger = _DropNotices(), logging.getLogger("absl")  # TFDS logs through absl
    bars = tqdm_utils._active  # noqa: SLF001 - TFDS has a setter but no getter
    logger.addFilter(notices)
    tfds.display_progress_bar(bars and sys.stderr.isatty())
    try:
        yield
    finally:
        logger.removeFilter(notices)
        tfds.display_progress_bar(bars)


def prepare(config: TextFilesConfig, data_dir: str = "") -> TextFiles:
    """Builds the dataset unless already built; returns the builder. Input checks run first."""
    data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
    with _quiet_tfds():
        builder = TextFiles(config=config, data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            return builder
        paths = corpus_files(config.files)  # fail in one sentence before TFDS starts writing
        print(_build_line(config, paths, data_dir), flush=True)
        try:
            builder.download_and_prepare()
        except OSError:
            # Several processes sharing a data_dir may build at once; TFDS's final rename then
            # fails for all but the first, whose complete dataset is the same one.
            builder = TextFiles(config=config, data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise
    return builder


def _build_line(config: TextFilesConfig, paths: list[str], data_dir: str) -> str:
    """What is about to be built, and whether an earlier build of the same glob is now stale."""
    prefix = config.name.rsplit("_", 1)[0]
    earlier = sorted(glob.glob(os.path.join(data_dir, "text_files", f"{prefix}_*",
                                            str(config.version), "dataset_info.json")),
                     key=os.path.getmtime)
    size = sum(os.path.getsize(p) for p in paths) / 1e6
    where = os.path.join(data_dir, "text_files", config.name)
    source = config.files or "the Python standard library"
    if earlier:
        return (f"The files of {source} changed since the corpus was built into "
                f"{os.path.dirname(os.path.dirname(earlier[-1]))}; building it again from "
                f"{len(paths)} files ({size:.1f} MB) into {where}.")
    return f"Building the corpus from {len(paths)} files of {source} ({size:.1f} MB) into {where}."


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Build a text_files TFDS dataset.")
    parser.add_argument("--name", default="stdlib")
    parser.add_argument("--files", default="")
    parser.add_argument("--jsonl_field", default="text")
    parser.add_argument("--data_dir", default="")
    args = parser.parse_args(argv)
    try:
        b = prepare(make_config(args.name, args.files, args.jsonl_field), args.data_dir)
    except (ValueError, PermissionError) as e:  # plain mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(b.data_dir, {k: v.num_examples for k, v in b.info.splits.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
