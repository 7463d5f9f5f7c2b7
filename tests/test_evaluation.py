"""Held-out sets (llama_jax.evaluation, train.eval_sets, tools/evaluate.py): every token after
BOS scored once, packed documents scored as if alone, bits per byte from UTF-8 bytes, the
loop's numbers equal to the tool's, and one-sentence errors before training starts."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax import evaluation, train
from llama_jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["def f(x):\n    return x\n", "héllo 東京 🦙 " * 9, "a", "  \t spaced\n\n"]


def test_pack_scores_every_token_after_bos_once():
    tok = ByteTokenizer()
    s = evaluation.pack("s", DOCS, tok, rows=2, seq_len=16)
    stacked = {k: np.concatenate([b[k] for b in s.batches]) for k in evaluation.FIELDS}
    mask = stacked["loss_mask"].astype(bool)
    assert stacked["inputs"].shape[1] == 16 and len(stacked["inputs"]) % 2 == 0
    # The scored targets are exactly each document's bytes and its EOS, none twice.
    expected = sorted(t for d in DOCS for t in tok.encode(d, bos=True, eos=True)[1:])
    assert sorted(stacked["targets"][mask].tolist()) == expected
    assert (s.n_docs, s.n_bytes) == (len(DOCS), sum(len(d.encode()) for d in DOCS))
    # Positions restart at 0 with every chunk; chunk = one segment id within a row.
    starts = mask & (stacked["positions"] == 0)
    assert starts.sum() == sum(math.ceil((len(d.encode()) + 1) / 16) for d in DOCS)


def test_token_budget_keeps_whole_documents():
    s = evaluation.pack("s", DOCS * 10, ByteTokenizer(), rows=2, seq_len=16, max_tokens=40)
    # Documents are taken until 40 scored tokens are reached; the last one is kept whole.
    sizes = [len(d.encode()) + 1 for d in DOCS * 10]
    n = next(i + 1 for i in range(len(sizes)) if sum(sizes[:i + 1]) >= 40)
    assert s.n_docs == n and s.n_bytes == sum(sizes[:n]) - n


@pytest.fixture(scope="module")
def small_model():
    c = llama_jax.get_config("tiny", vocab_size=259, n_layers=1, dim=32, n_heads=2,
                             n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    return llama_jax.create(c, seed=1)


def test_packed_documents_score_as_if_alone(small_model):
    from flax import nnx
    tok = ByteTokenizer()
    docs = DOCS[:1] + DOCS[2:]  # each fits one chunk of 32: no cut contexts
    s = evaluation.pack("s", docs, tok, rows=2, seq_len=32)
    graphdef, params = nnx.split(small_model, nnx.Param)
    out = evaluation.results(
        [s], lambda b: train.eval_step(params, jax.tree.map(jnp.asarray, b), graphdef))
    ce = 0.0
    for d in docs:  # the model on one document at a time, no packing, no masks
        ids = jnp.asarray([tok.encode(d, bos=True, eos=True)])
        logp = jax.nn.log_softmax(small_model(ids[:, :-1]), axis=-1)
        ce -= float(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum())
    n_bytes = sum(len(d.encode()) for d in docs)
    assert out["eval/s/bits_per_byte"] == pytest.approx(ce / math.log(2) / n_bytes, rel=1e-5)
    assert out["eval/s/loss"] == pytest.approx(ce / (n_bytes + len(docs)), rel=1e-5)
    assert out["eval/s/perplexity"] == pytest.approx(math.exp(out["eval/s/loss"]), rel=1e-9)


def test_spec_names_and_mistakes(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "empty.txt").write_text("")
    assert evaluation.parse(f"validation, x={tmp_path}/*.txt, {tmp_path}/a.txt") == [
        ("validation", "validation"), ("x", f"{tmp_path}/*.txt"), ("a", f"{tmp_path}/a.txt")]
    with pytest.raises(ValueError, match=r"eval set 'nope' \(.*\): the glob .* matches no files"):
        evaluation.check(f"nope={tmp_path}/missing/*.txt")
    with pytest.raises(ValueError, match="'empty'.*are all empty"):
        evaluation.check(f"{tmp_path}/empty.txt")
    with pytest.raises(ValueError, match="used twice"):
        evaluation.parse(f"a={tmp_path}/a.txt,a={tmp_path}/a.txt")
    with pytest.raises(ValueError, match="only a training run has"):
        evaluation.check("validation", corpus_split=False)


def _tiny_config(tmp_path, **overrides):
    spec = importlib.util.spec_from_file_location(
        "tiny_config", os.path.join(ROOT, "experiments", "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 20)
    c.data.files, c.data.data_dir = f"{corpus}/*.txt", str(tmp_path / "tfds")
    c.train.update(steps=6, eval_every=6, eval_batches=1, checkpoint_every=0, sample_tokens=0)
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(c[section], field, value)
    return c


@pytest.mark.slow
def test_loop_reports_what_the_tool_reports(tmp_path):
    from tools import evaluate as tool
    held = tmp_path / "held"
    held.mkdir()
    (held / "a.py").write_text("import os\nprint(os.getcwd())\n" * 5)
    (held / "b.jsonl").write_text(json.dumps({"text": "über 東京 " * 30}) + "\n")
    spec = f"code={held}/*.py,web={held}/b.jsonl"
    workdir = tmp_path / "run"
    train.run(_tiny_config(tmp_path, **{"train.eval_sets": spec}), str(workdir))
    records = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    [loop] = [r for r in records if "eval/code/loss" in r]
    assert loop["step"] == 6 and "eval_loss" in loop
    c = _tiny_config(tmp_path)
    out = tool.evaluate(str(workdir / "export"), spec, seq_len=c.data.seq_len,
                        rows=c.data.global_batch, max_batches=c.train.eval_batches)
    for name in ("code", "web"):
        for metric in ("loss", "perplexity", "bits_per_byte"):
            key = f"eval/{name}/{metric}"
            assert loop[key] == pytest.approx(out[key], rel=1e-5), key
    assert 0 < out["eval/web/bits_per_byte"] < 8 * 1.1  # bytes: ~ln(259)/ln 2 untrained


def test_missing_eval_set_stops_before_training(tmp_path):
    workdir = tmp_path / "run"
    config = _tiny_config(tmp_path, **{"train.eval_sets": f"held={tmp_path}/nothing/*.txt"})
    with pytest.raises(ValueError, match=r"eval set 'held' .* matches no files"):
        train.run(config, str(workdir))
    assert not os.path.exists(workdir / "checkpoints")
