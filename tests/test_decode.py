"""The decode loop against transformers' generate(), the no-cache forward, and itself."""

import contextlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax as lj
from llama_jax import checkpoint, decode, model as model_lib, tokenizer as tokenizer_lib
from llama_jax.decode_setup import pad_batch
from llama_jax.sampling import SamplingParams

VOCAB, NEW = 256, 64
PROMPTS = [[1, 17, 200, 3, 45], [1, 99, 5, 250, 8, 61, 7, 33, 120, 2, 64]]

HF_CASES = {
    "multi_head": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    # original context 16: positions past 16 · 4 = 64 use the scaled low frequencies.
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_pair(request, tmp_path_factory):
    """A random-init transformers model and the same weights loaded by llama_jax.load."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **HF_CASES[request.param])
    torch.manual_seed(sorted(HF_CASES).index(request.param))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so logits spread and argmax is stable
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    d = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(d)
    return hf, lj.load(d)


def _hf_greedy(hf, prompt, new):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(hf_pair):
    """Both prompts in one batch: 64 greedy tokens equal HF's, and each token's logprob is
    HF's log-softmax at that position (1e-4 relative)."""
    hf, model = hf_pair
    out = decode.generate(model, PROMPTS, NEW, stop_ids=[])
    for b, prompt in enumerate(PROMPTS):
        assert out.lengths[b] == NEW
        assert out.ids(b) == _hf_greedy(hf, prompt, NEW)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.ids(b)])).logits[0].double()
        ref = torch.log_softmax(logits, -1).numpy()
        n = len(prompt)
        want = ref[np.arange(n - 1, n - 1 + NEW), out.ids(b)]
        np.testing.assert_allclose(out.logprobs[b], want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Against ourselves, on the tiny preset.


@pytest.fixture(scope="module")
def tiny():
    model = lj.create(lj.get_config("tiny"), seed=1)
    return model, decode.prepare(model)


def _rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_cached_logits_equal_full_forward(tiny):
    """prefill then decode steps: every step's logits equal the no-cache forward over the
    whole sequence so far (f32, 1e-5 relative), for two rows of different lengths."""
    model, weights = tiny
    prompts = [[5, 9, 300], [7, 1, 2, 3, 4, 8, 11, 90, 400]]
    no_cache = nnx.jit(lambda m, t: m(t))  # causal: right padding does not change the logits
    step = jax.jit(decode.forward)
    tokens, lengths = pad_batch(prompts, 16, 1)
    cache = model_lib.init_cache(model.config, 2, 32)
    logits, cache = jax.jit(decode.prefill)(weights, tokens, lengths, cache)
    seqs = [list(p) for p in prompts]
    for i in range(6):
        full = no_cache(model, pad_batch(seqs, 16, 1)[0])
        for b, seq in enumerate(seqs):
            assert _rel_err(logits[b], full[b, len(seq) - 1]) <= 1e-5, (i, b)
        nxt = np.asarray(logits.argmax(-1))
        positions = jnp.asarray([[len(s)] for s in seqs], jnp.int32)
        for seq, t in zip(seqs, nxt):
            seq.append(int(t))
        out, cache = step(weights, jnp.asarray(nxt[:, None], jnp.int32), positions,
                          jnp.ones((2, 1), jnp.int32), cache)
        logits = out[:, 0]


def test_bf16_model_decodes_within_bf16_rounding(tiny):
    """A bf16 model's prefill logits stay within bf16 rounding of the f32 model's (and are not
    the f32 ones: the weights really are bf16)."""
    model, weights = tiny
    bf16 = decode.prepare(decode.with_dtype(model, "bfloat16"))
    assert bf16.embed.dtype == jnp.bfloat16
    assert jax.tree.leaves(bf16.layers[0]["mlp"])[0].dtype == jnp.bfloat16
    tokens, lengths = pad_batch(PROMPTS, 16, 1)
    cache = model_lib.init_cache(model.config, 2, 32)
    ref, _ = jax.jit(decode.prefill)(weights, tokens, lengths, cache)
    out, _ = jax.jit(decode.prefill)(bf16, tokens, lengths,
                                     model_lib.init_cache(bf16.config, 2, 32))
    assert out.dtype == jnp.float32 and 1e-4 < _rel_err(out, ref) < 5e-2


def test_decode_step_drives_the_same_loop(tiny):
    """The donated decode_step, called from the host, reproduces generate's tokens."""
    _, weights = tiny
    ref = decode.generate(weights, [[3, 4, 5]], 6, stop_ids=[])
    tokens, lengths = pad_batch([[3, 4, 5]], 16, 1)
    args = (SamplingParams().arrays(), jnp.full((decode.MAX_STOP_IDS,), -1, jnp.int32),
            jnp.int32(6))
    state = decode.start(weights, tokens, lengths, jax.random.PRNGKey(0), *args, cache_len=32,
                         n_buffer=16)
    for _ in range(5):
        old = state
        state = decode.decode_step(weights, state, *args)
        assert old.cache["k"].is_deleted()  # donated
    assert np.asarray(state.tokens[0, :6]).tolist() == ref.ids(0)


def test_batch_gives_each_prompt_what_it_gives_alone(tiny):
    _, weights = tiny
    prompts = [[2, 3], list(range(10, 27)), [400, 401, 402, 403, 404]]  # buckets 16, 32, 16
    batch = decode.generate(weights, prompts, 12, stop_ids=[])
    for b, prompt in enumerate(prompts):
        alone = decode.generate(weights, [prompt], 12, stop_ids=[])
        assert batch.ids(b) == alone.ids(0)
        np.testing.assert_allclose(batch.logprobs[b], alone.logprobs[0], rtol=1e-5, atol=1e-5)


def test_stop_ids_end_each_row(tiny):
    _, weights = tiny
    prompts = [[2, 3], [400, 401, 402, 403, 404]]
    free = decode.generate(weights, prompts, 10, stop_ids=[])
    stop = int(free.tokens[0, 3])
    first = [r.tolist().index(stop) if stop in r.tolist() else None for r in free.tokens]
    out = decode.generate(weights, prompts, 10, stop_ids=[stop, 511])
    for b in range(2):
        n = 10 if first[b] is None else first[b] + 1
        assert out.lengths[b] == n
        assert out.ids(b) == free.ids(b)[:n]  # the stop token is kept, nothing after it
        assert (out.tokens[b, n:] == 0).all()


@contextlib.contextmanager
def compilations():
    """The names of the functions XLA compiles inside the block ("start" for jit(start)), from
    the backend-compile event jax.monitoring reports with each compilation's function name."""
    names = []

    def listen(event, _, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(re.sub(r"^jit\((.*)\)$", r"\1", str(kw.get("fun_name"))))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_compiles_bounded_across_lengths(tiny):
    """20 prompts of lengths 1..60 and max_new 1..16 compile once per prompt bucket (16,
    32, 64), not once per length."""
    _, weights = tiny
    rng = np.random.RandomState(0)
    jax.clear_caches()  # so that every bucket compiles here, whatever ran before
    with compilations() as names:
        for i in range(20):
            length = [1, 60][i] if i < 2 else rng.randint(1, 61)
            prompt = rng.randint(0, 512, length).tolist()
            out = decode.generate(weights, [prompt], int(rng.randint(1, 17)), stop_ids=[])
            assert out.lengths[0] >= 1
    assert names.count("start") == 3 and names.count("loop") == 3, names


def test_same_seed_same_sample(tiny):
    _, weights = tiny
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = decode.generate(weights, [[1, 2, 3]], 16, params, seed=7, stop_ids=[])
    b = decode.generate(weights, [[1, 2, 3]], 16, params, seed=7, stop_ids=[])
    c = decode.generate(weights, [[1, 2, 3]], 16, params, seed=8, stop_ids=[])
    assert a.ids(0) == b.ids(0) and a.ids(0) != c.ids(0)


def test_stream_sees_every_token_in_order(tiny):
    _, weights = tiny
    seen = []
    out = decode.generate(weights, [[1, 2, 3], [4]], 7, stop_ids=[],
                          stream=lambda step, tok, lengths: seen.append(
                              (int(step), tok.tolist(), lengths.tolist())))
    assert [s for s, _, _ in seen] == list(range(1, 8))
    assert [t for _, t, _ in seen] == out.tokens.T.tolist()


@pytest.mark.parametrize("data, tensor", [(2, 4), (4, 2)])
def test_sharded_equals_single_device(tiny, data, tensor):
    """tensor 4 > K = 2 kv heads replicates them; tensor 2 shards them."""
    model, weights = tiny
    prompts = [[5, 6, 7], list(range(30, 50)), [9]]  # 3 rows: padded to fill the data axis
    ref = decode.generate(weights, prompts, 8, stop_ids=[])
    mesh = decode.make_mesh(data, tensor)
    sharded = decode.prepare(decode.shard(model, mesh))
    assert sharded.layers[0]["attn"]["wq"].sharding.spec[1] == "tensor"  # [D, N, H]
    assert sharded.layers[0]["mlp"]["w_down"].sharding.spec[0] == "tensor"  # [F, D]
    seen = []
    out = decode.generate(sharded, prompts, 8, stop_ids=[], mesh=mesh,
                          stream=lambda step, tok, lengths: seen.append(tok.tolist()))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert np.asarray(seen)[:, :3].T.tolist() == ref.tokens.tolist()  # streams work sharded
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence each, before anything compiles.


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "No prompts given"),
    ([[1, 2], []], {}, "Prompt 1 is empty"),
    ([[1] * 250], dict(max_new_tokens=10), "does not fit the cache of 256 slots"),
    ([[1, 512]], {}, "outside the model's vocabulary"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ([[1]], dict(sampling=SamplingParams(top_p=0.0)), "top_p must be in"),
    ([[1]], dict(sampling=SamplingParams(temperature=-1.0)), "temperature must be >= 0"),
    ([[1]], dict(sampling=SamplingParams(top_k=1000)), "top_k must be in"),
    ([[1]], dict(stop_ids=list(range(9))), "At most 8 stop ids"),
])
def test_bad_input_is_rejected_before_compiling(tiny, prompts, kwargs, match):
    _, weights = tiny
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with compilations() as names, pytest.raises(ValueError, match=match):
        decode.generate(weights, prompts, **kwargs)
    assert names == []


def test_tokenizer_vocab_must_match():
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the checkpoint's"):
        decode.check_vocab(300, lj.get_config("tiny"))
    decode.check_vocab(512, lj.get_config("tiny"))


# ----------------------------------------------------------------------------------------------
# The CLI, end to end on a params-only checkpoint with a SentencePiece tokenizer.


def _write_spm(vocab, path):
    """A byte-fallback SentencePiece BPE model with exactly `vocab` pieces."""
    from sentencepiece import sentencepiece_model_pb2 as spb

    m = spb.ModelProto()
    m.trainer_spec.model_type = spb.TrainerSpec.BPE
    m.trainer_spec.vocab_size, m.trainer_spec.byte_fallback = vocab, True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = 0, 1, 2
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name, m.normalizer_spec.add_dummy_prefix = "identity", True
    m.normalizer_spec.escape_whitespaces = True
    piece = spb.ModelProto.SentencePiece
    for text, kind in (("<unk>", piece.UNKNOWN), ("<s>", piece.CONTROL), ("</s>", piece.CONTROL)):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece="<0x%02X>" % b, score=0.0, type=piece.BYTE)
    for i in range(vocab - len(m.pieces)):
        m.pieces.add(piece="\u2581w%d" % i, score=-float(i), type=piece.NORMAL)
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "decode.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_cli_json_batch_matches_library(tiny, tmp_path):
    model, weights = tiny
    _write_spm(512, str(tmp_path / "tok.model"))
    checkpoint.save_params(str(tmp_path / "ckpt"), model,
                           tokenizer_path=str(tmp_path / "tok.model"))
    (tmp_path / "prompts.txt").write_text("hello there\nw5 w7 w9 and more words\n")
    r = _cli(f"--checkpoint={tmp_path / 'ckpt'}", f"--prompt_file={tmp_path / 'prompts.txt'}",
             "--max_new_tokens=6", "--format=json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "tok.model"))
    texts = ("hello there", "w5 w7 w9 and more words")
    prompts = [tok.encode(t, bos=True, eos=False) for t in texts]
    ref = decode.generate(weights, prompts, 6)
    assert [row["ids"] for row in rows] == [ref.ids(0), ref.ids(1)]
    assert rows[1]["text"] == tok.decode([t for t in ref.ids(1) if t != tok.eos_id])
    np.testing.assert_allclose(rows[0]["logprobs"], ref.logprobs[0, :ref.lengths[0]], atol=1e-5)
    bad = _cli(f"--checkpoint={tmp_path / 'ckpt'}", "--prompt=hi", "--top_p=0")
    assert bad.returncode != 0 and bad.stderr.strip().endswith(
        "error: top_p must be in (0, 1] (1 disables it), got 0.0.")
