"""Tests of llama_jax/tokenizer_training.py and its command line, tools/train_tokenizer.py: a
tiny LLaMA-style SentencePiece model trained on a few stdlib files, checked for byte fallback,
split digits, LLaMA's special ids, and use in the data pipeline."""

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from llama_jax import data
from llama_jax import tokenizer_training as train_tokenizer
from llama_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILES = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny"
    path = train_tokenizer.train(str(out), vocab_size=400, files=FILES, num_threads=1)
    return load_tokenizer(path)


def test_llama_special_ids_and_options(tok):
    from sentencepiece import sentencepiece_model_pb2
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
    assert tok.vocab_size == 400
    proto = sentencepiece_model_pb2.ModelProto.FromString(tok.sp.serialized_model_proto())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert tok.sp.id_to_piece(3) == "<0x00>"  # the 256 byte pieces follow the specials


def test_byte_fallback_round_trips_any_unicode(tok):
    text = "naïve café — 日本語テキスト 🙂🦙 \t  tabs and  double  spaces\nΩ≈√∫"
    ids = tok.encode(text, bos=False, eos=False)
    assert 0 not in ids  # nothing maps to unk
    assert tok.decode(ids) == text
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces  # the emoji's first UTF-8 byte: it went through byte fallback


def test_digits_are_split(tok):
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("x = 1234567890", bos=False, eos=False)]
    digits = [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digits) == "1234567890" and all(len(d) == 1 for d in digits)


def test_trained_tokenizer_feeds_the_pipeline(tok, tmp_path):
    cfg = data.DataConfig(files=FILES, name="json_src", seq_len=32, global_batch=2,
                          data_dir=str(tmp_path))
    batch = next(iter(data.make_dataset(cfg, tok, split="train", vocab_size=tok.vocab_size)))
    assert batch["inputs"].shape == (2, 32) and batch["inputs"].max() < tok.vocab_size
    starts = batch["inputs"][batch["positions"] == 0]
    assert np.all(starts == tok.bos_id)  # every document piece here begins a document
    text = tok.decode(batch["inputs"][0][batch["segment_ids"][0] == 1][1:])
    assert len(text) > 20


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 300"):
        train_tokenizer.train(str(tmp_path / "t"), vocab_size=200, files=FILES)


def test_command_line_trains_and_refuses_plain_mistakes_in_one_line(tmp_path):
    tool = os.path.join(ROOT, "tools", "train_tokenizer.py")
    run = lambda *args: subprocess.run([sys.executable, tool, *args], cwd=tmp_path,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    ok = run(f"--files={FILES}", f"--output={tmp_path / 'cli'}", "--vocab_size=400",
             "--num_threads=1")
    assert ok.returncode == 0 and ok.stdout.strip() == str(tmp_path / "cli.model"), ok.stderr
    bad = run(f"--files={tmp_path / 'none*.txt'}", f"--output={tmp_path / 'x'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: the glob '{tmp_path / 'none*.txt'}' matches no files; check the path (use ** "
        f"with quotes for recursive matches)."]
