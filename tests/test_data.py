"""Tests of llama_jax/corpus.py (TFDS builder) and llama_jax/data.py (Grain pipeline).

Expected batches are rebuilt here from the raw documents with plain Python loops, independent of
grain's packer: concatenate `[BOS] + bytes + [EOS]` per lane, cut into rows of T+1 tokens.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from llama_jax import corpus
from llama_jax import data

T, G = 16, 4
DOCS = [f"doc {i}: " + "x" * (i * 7 % 23) + "é" * (i % 3) for i in range(30)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def jsonl_cfg(tmp_path_factory, data_dir):
    corpus = tmp_path_factory.mktemp("corpus")
    for part in range(3):  # three files, ten documents each, text under a custom field
        with open(corpus / f"part{part}.jsonl", "w") as f:
            for doc in DOCS[part * 10:(part + 1) * 10]:
                f.write(json.dumps({"content": doc, "id": 0}) + "\n")
    return data.DataConfig(name="toy", files=str(corpus / "*.jsonl"), jsonl_field="content",
                           seq_len=T, global_batch=G, seed=3, data_dir=data_dir, shuffle=False)


def _texts(source):
    return [source[i]["text"].decode() for i in range(len(source))]


def test_stdlib_corpus_builds_with_disjoint_deterministic_splits(data_dir):
    cfg = data.DataConfig(data_dir=data_dir)
    train, val = data.data_source(cfg, "train"), data.data_source(cfg, "validation")
    files = corpus.corpus_files("")
    root = corpus.corpus_root("")
    texts = {os.path.relpath(p, root): open(p, encoding="utf-8", errors="replace").read()
             for p in files}
    texts = {k: v for k, v in texts.items() if v.strip()}  # empty files are no documents
    assert len(train) + len(val) == len(texts) > 300
    assert 0 < len(val) < len(texts) // 10
    want_val = sorted(v for k, v in texts.items() if corpus.key_hash(k) < 0.02)
    assert sorted(_texts(val)) == want_val
    built = os.path.join(data_dir, "text_files")
    assert not [d for d in os.listdir(os.path.join(built, os.listdir(built)[0]))
                if d.startswith("incomplete")]


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_split_documents_partitions_and_never_leaves_validation_empty(fraction):
    docs = [(f"file{i}.txt", f"text {i}") for i in range(40)]
    train = list(corpus.split_documents(iter(docs), fraction, False))
    val = list(corpus.split_documents(iter(docs), fraction, True))
    assert sorted(train + val) == sorted(docs) and val
    if fraction == 0.0:  # no hash below 0: the smallest-hash document is held out
        assert val == [min(docs, key=lambda d: corpus.key_hash(d[0]))]
    else:
        assert val == [d for d in docs if corpus.key_hash(d[0]) < fraction]


def test_jsonl_corpus_reads_the_configured_field(jsonl_cfg):
    got = _texts(data.data_source(jsonl_cfg, "train")) + _texts(
        data.data_source(jsonl_cfg, "validation"))
    assert sorted(got) == sorted(DOCS)


def _expected_batches(texts, n_batches):
    """Lane j packs documents j, j+G, ... (no shuffle) into rows of T+1 tokens."""
    tok = data.ByteTokenizer()
    out = []
    for j in range(G):
        stream, k = [], j
        while len(stream) < n_batches * (T + 1):
            ids = tok.encode(texts[k % len(texts)], bos=True, eos=True)
            stream, k = stream + ids, k + G
        rows = [stream[r * (T + 1):(r + 1) * (T + 1)] for r in range(n_batches)]
        out.append(rows)
    return [np.array([out[j][b] for j in range(G)]) for b in range(n_batches)]


def _segments(row):
    """Segment ids and positions of one packed row from its BOS tokens, by hand."""
    seg, pos, s, p = [], [], 1, 0
    for i, t in enumerate(row):
        if t == 1 and i > 0:
            s, p = s + 1, 0
        seg.append(s)
        pos.append(p)
        p += 1
    return np.array(seg), np.array(pos)


def test_packed_batches_match_a_hand_packed_stream(jsonl_cfg):
    texts = _texts(data.data_source(jsonl_cfg, "train"))
    it = iter(data.make_dataset(jsonl_cfg, data.ByteTokenizer(), split="train"))
    for want in _expected_batches(texts, 12):
        got = next(it)
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
            k: ((G, T), np.int32) for k in
            ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        np.testing.assert_array_equal(got["inputs"], want[:, :-1])
        np.testing.assert_array_equal(got["targets"], want[:, 1:])
        for b in range(G):
            seg, pos = _segments(want[b])
            np.testing.assert_array_equal(got["segment_ids"][b], seg[:-1])
            np.testing.assert_array_equal(got["positions"][b], pos[:-1])
            np.testing.assert_array_equal(got["loss_mask"][b], seg[1:] == seg[:-1])


def test_process_shards_union_is_the_global_batch(jsonl_cfg):
    cfg = dataclasses.replace(jsonl_cfg, shuffle=True)
    tok = data.ByteTokenizer()
    whole = iter(data.make_dataset(cfg, tok, split="train"))
    parts = [iter(data.make_dataset(cfg, tok, split="train", process_index=p, process_count=2))
             for p in range(2)]
    for _ in range(8):
        want, got = next(whole), [next(p) for p in parts]
        for k in want:
            assert got[0][k].shape[0] == G // 2
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])


def test_shuffle_seed_changes_order_and_epochs_differ(jsonl_cfg):
    tok = data.ByteTokenizer()
    take = lambda cfg: np.stack([next(it)["inputs"] for it in  # noqa: E731
                                 [iter(data.make_dataset(cfg, tok, split="train"))] * 6])
    plain = take(jsonl_cfg)
    a = take(dataclasses.replace(jsonl_cfg, shuffle=True, seed=1))
    b = take(dataclasses.replace(jsonl_cfg, shuffle=True, seed=2))
    assert not np.array_equal(a, plain) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, take(dataclasses.replace(jsonl_cfg, shuffle=True, seed=1)))


def test_resume_from_state_sees_the_same_batches(jsonl_cfg):
    cfg, tok, n, k = dataclasses.replace(jsonl_cfg, shuffle=True), data.ByteTokenizer(), 10, 4
    ref = [next(it) for it in [iter(data.make_dataset(cfg, tok, split="train"))] * n]
    it = iter(data.make_dataset(cfg, tok, split="train"))
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive Orbax's JSON handler
    fresh = iter(data.make_dataset(cfg, tok, split="train"))
    fresh.set_state(state)
    for want in ref[k:]:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_orbax_checkpoints_the_iterator(jsonl_cfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    tok = data.ByteTokenizer()
    it = iter(data.make_dataset(jsonl_cfg, tok, split="train"))
    next(it), next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = next(it)
        fresh = iter(data.make_dataset(jsonl_cfg, tok, split="train"))
        restored = mngr.restore(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
    np.testing.assert_array_equal(next(restored)["inputs"], want["inputs"])


def test_bad_inputs_fail_in_one_sentence(jsonl_cfg, tmp_path, monkeypatch):
    tok = data.ByteTokenizer()
    bad = dataclasses.replace(jsonl_cfg, name="empty", files=str(tmp_path / "none*.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        data.make_dataset(bad, tok)
    (tmp_path / "a.txt").write_text("hello")
    monkeypatch.setattr(corpus.os, "access", lambda p, mode: False)  # root reads anything
    with pytest.raises(PermissionError, match="cannot read"):
        data.make_dataset(dataclasses.replace(bad, files=str(tmp_path / "*.txt")), tok)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        data.make_dataset(jsonl_cfg, tok, max_seq_len=T - 1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.make_dataset(jsonl_cfg, tok, process_count=3)
    with pytest.raises(ValueError, match="the tokenizer has 259 ids"):
        data.make_dataset(jsonl_cfg, tok, vocab_size=128)
    (tmp_path / "b.jsonl").write_text('{"content": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2 is not a JSON object"):
        data.make_dataset(dataclasses.replace(bad, name="broken",
                                              files=str(tmp_path / "*.jsonl")), tok)
    # The failed build left nothing a reader could mistake for a dataset.
    broken = [d for d in os.listdir(os.path.join(jsonl_cfg.data_dir, "text_files"))
              if d.startswith("broken")]
    assert broken and all(not os.listdir(os.path.join(jsonl_cfg.data_dir, "text_files", d))
                          for d in broken), broken


# ----------------------------------------------------------------------------------------------
# The build follows the files: an edit, an added file, or empty files.


def _first_inputs(cfg):
    it = iter(data.make_dataset(cfg, data.ByteTokenizer(), split="train", prefetch=0))
    return next(it)["inputs"]


def test_edited_corpus_is_rebuilt_and_changes_the_first_batch(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"document {i} " * 4)
    cfg = data.DataConfig(name="edited", files=str(folder / "*.txt"), seq_len=T, global_batch=2,
                          data_dir=str(tmp_path / "tfds"), shuffle=False)
    before = _first_inputs(cfg)
    assert "Building the corpus from 6 files" in capsys.readouterr().out
    np.testing.assert_array_equal(_first_inputs(cfg), before)  # unchanged: the same build
    assert capsys.readouterr().out == ""

    # Same size, new text: only the modification time tells.
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"DOCUMENT {i} " * 4)
        os.utime(folder / f"{i}.txt", ns=(1, 10**18 + i))
    after = _first_inputs(cfg)
    assert not np.array_equal(after, before)
    assert data.ByteTokenizer().decode(after[0]).startswith("DOCUMENT")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "changed since the corpus was built" in out[0], out

    (folder / "6.txt").write_text("an added file")  # a new file under the same glob
    texts = _texts(data.data_source(cfg, "train")) + _texts(data.data_source(cfg, "validation"))
    assert "an added file" in texts and len(texts) == 7


def test_corpus_of_empty_files_fails_in_one_sentence(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    cfg = data.DataConfig(name="empty", files=str(tmp_path / "*.txt"), seq_len=T, global_batch=2,
                          data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=r"the 3 file\(s\) matched by .* are all empty"):
        data.make_dataset(cfg, data.ByteTokenizer())
    assert not os.path.exists(tmp_path / "tfds" / "text_files")  # nothing was written
    # Whitespace and empty JSONL texts are no documents either: one sentence, not a run.
    (tmp_path / "0.txt").write_text(" \n\t\n")
    (tmp_path / "1.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="fewer than two documents with text"):
        data.make_dataset(dataclasses.replace(cfg, files=str(tmp_path / "*.*")),
                          data.ByteTokenizer())


def test_building_prints_no_tfds_notices(tmp_path, capsys, caplog):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    cfg = data.DataConfig(name="quiet", files=str(tmp_path / "*.txt"), seq_len=T, global_batch=2,
                          data_dir=str(tmp_path / "tfds"))
    data.make_dataset(cfg, data.ByteTokenizer(), prefetch=0)
    data.make_dataset(cfg, data.ByteTokenizer(), split="validation", prefetch=0)
    out = capsys.readouterr()
    assert "Downloading and preparing" not in out.out + out.err
    assert out.out.count("Building the corpus") == 1
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()
                or "Variant folder" in r.getMessage()]
