"""Checkpoint conversion against transformers: HF -> Orbax -> HF, HF -> Meta -> HF, bad input,
and peak memory of streaming conversion."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax import safetensors_io

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tools import convert_checkpoint as cc  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOKENS = np.random.default_rng(0).integers(0, 250, size=(2, 11))
_LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=16)
CASES = {
    "multihead": dict(num_key_value_heads=4),
    "gqa_llama3": dict(num_key_value_heads=2, rope_parameters=_LLAMA3),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "sharded": dict(num_key_value_heads=1, shard="60KB"),
}


def make_hf(directory, *, shard=None, dtype=torch.float32, **kw):
    """A random LlamaForCausalLM saved by transformers; returns (model, its logits on TOKENS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, **kw)
    torch.manual_seed(len(directory))
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, weights large enough to matter
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return model, hf_logits(model)


def hf_logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def ours(path):
    return np.asarray(llama_jax.load(path)(jnp.asarray(TOKENS)))


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_orbax_to_hf_logits(tmp_path, case):
    from transformers import LlamaForCausalLM

    model, ref = make_hf(str(tmp_path / "hf"), **CASES[case])
    if case == "sharded":
        assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), to="orbax")
    assert llama_jax.io.detect_format(str(tmp_path / "orbax")) == "orbax"
    assert_close(ours(str(tmp_path / "orbax")), ref)

    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "hf2"), to="hf")
    back, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf2"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert os.path.exists(tmp_path / "hf2" / "generation_config.json")
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert_close(hf_logits(back.eval()), ref)


def test_mesh_sharded_orbax_output(tmp_path):
    """--mesh: every leaf is written as the shards of the target mesh, layer by layer (chunks
    [1, D/2, N/2, H] for wq), restores onto that mesh from Orbax's own metadata, and gives the
    same logits."""
    import orbax.checkpoint as ocp

    _, ref = make_hf(str(tmp_path / "hf"), num_key_value_heads=2)
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), to="orbax", mesh="data:2,tensor:2")
    params = tmp_path / "orbax" / "params"
    wq = json.load(open(params / "layers.attn.wq" / ".zarray"))
    assert wq["shape"] == [2, 64, 4, 16] and wq["chunks"] == [1, 32, 2, 16]  # [L, D_d, N_t, H]
    assert json.load(open(params / "embed" / ".zarray"))["chunks"] == [128, 32]  # [V_t, D_d]
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(str(params))  # no target: the shardings the converter wrote
    assert {s.data.shape for s in tree["layers"]["attn"]["wq"].addressable_shards} == {
        (2, 32, 2, 16)}
    assert len(tree["layers"]["attn"]["wq"].sharding.device_set) == 4
    assert_close(ours(str(tmp_path / "orbax")), ref)
    mesh = cc.parse_mesh("data:2,tensor:2")
    model = llama_jax.checkpoint.load_params(str(tmp_path / "orbax"), mesh=mesh)
    assert_close(np.asarray(model(jnp.asarray(TOKENS))), ref)
    with pytest.raises(ValueError, match="--mesh"):
        cc.convert(str(tmp_path / "hf"), str(tmp_path / "x"), to="orbax", mesh="data:3,tensor:3")


def test_rope_scaling_factor_is_honoured(tmp_path):
    """Llama 3.2 scales RoPE by 32 where Meta's reference (llama-models 0.3.0 `apply_scaling`)
    hard-codes 8: our RoPE follows the config's factor, matching transformers at 32 and not at
    8, and the factor survives HF -> Meta -> HF."""
    hf = str(tmp_path / "hf")
    _, ref = make_hf(hf, num_key_value_heads=2, rope_parameters=dict(_LLAMA3, factor=32.0))
    assert_close(ours(hf), ref)
    as8 = llama_jax.load(hf, rope_scaling=llama_jax.RopeScaling(8.0, 1.0, 4.0, 16))
    assert np.abs(np.asarray(as8(jnp.asarray(TOKENS))) - ref).max() > 1e-3 * np.abs(ref).max()
    make_hf(str(tmp_path / "hf32"), rope_parameters=dict(
        _LLAMA3, factor=32.0, original_max_position_embeddings=8192))
    cc.convert(str(tmp_path / "hf32"), str(tmp_path / "meta"), to="meta")
    assert json.load(open(tmp_path / "meta" / "params.json"))["rope_scaling_factor"] == 32.0
    cc.convert(str(tmp_path / "meta"), str(tmp_path / "hf2"), to="hf")
    assert json.load(open(tmp_path / "hf2" / "config.json"))["rope_scaling"]["factor"] == 32.0


def _hf_tokenizer_files(directory):
    """A tiny fast tokenizer saved by transformers, plus HF's other carried files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "hello", "world", "llama"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    json.dump({"bos_token": "<s>", "eos_token": "</s>"},
              open(os.path.join(directory, "special_tokens_map.json"), "w"))
    json.dump({"bos_token_id": 0, "eos_token_id": [1, 2], "temperature": 0.6, "top_p": 0.9,
               "do_sample": True}, open(os.path.join(directory, "generation_config.json"), "w"))
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(bytes(range(256)))  # carried as bytes, never parsed on the way


def test_tokenizer_and_generation_files_carried(tmp_path):
    """HF -> Orbax -> HF gives back tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json and tokenizer.model byte for byte (the
    Orbax export keeps them beside its config.json), transformers reads them; Meta output
    carries tokenizer.model only, and Meta -> HF brings it back."""
    from transformers import AutoTokenizer, GenerationConfig

    make_hf(str(tmp_path / "hf"), num_key_value_heads=2)
    _hf_tokenizer_files(str(tmp_path / "hf"))
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), to="orbax")
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "hf2"), to="hf")
    for name in llama_jax.checkpoint.CARRIED_FILES:
        original = (tmp_path / "hf" / name).read_bytes()
        assert (tmp_path / "orbax" / name).read_bytes() == original, name
        assert (tmp_path / "hf2" / name).read_bytes() == original, name
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf2"))
    assert tokenizer("hello llama")["input_ids"] == [3, 5]
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf2")).temperature == 0.6
    assert llama_jax.checkpoint.tokenizer_path(str(tmp_path / "orbax")) is not None
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "meta"), to="meta")
    assert sorted(os.listdir(tmp_path / "meta")) == [
        "consolidated.00.pth", "params.json", "tokenizer.model"]
    cc.convert(str(tmp_path / "meta"), str(tmp_path / "hf3"), to="hf")
    assert (tmp_path / "hf3" / "tokenizer.model").read_bytes() == bytes(range(256))
    assert json.load(open(tmp_path / "hf3" / "generation_config.json"))["eos_token_id"] == 2


def _sentencepiece_model(path, vocab_size=256):
    """A SentencePiece BPE model, as LLaMA 1/2 ship theirs, trained on this file's text."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(input=__file__, model_prefix=path[:-len(".model")],
                                   vocab_size=vocab_size, model_type="bpe", minloglevel=2)


@pytest.mark.parametrize("model_parallel,embedding_split", [(1, None), (2, 1), (2, 0)])
def test_llama2_release_layout_converts(tmp_path, model_parallel, embedding_split):
    """As Meta ships Llama 2: llama-2-7b/{params.json with vocab_size -1, consolidated.NN.pth},
    tokenizer.model one level up. The vocabulary comes from the embedding's shape (split over
    D as LLaMA 2's ParallelEmbedding does, or over V), the tokenizer from the parent; both
    outputs give transformers' logits and carry the tokenizer."""
    _, ref = make_hf(str(tmp_path / "hf"), num_key_value_heads=2)
    _sentencepiece_model(str(tmp_path / "hf" / "tokenizer.model"))
    release = tmp_path / "llama-2"
    src = release / "llama-2-7b"
    cc.convert(str(tmp_path / "hf"), str(src), to="meta", model_parallel=model_parallel,
               embedding_split=embedding_split)
    params = json.load(open(src / "params.json"))
    json.dump(dict(params, vocab_size=-1), open(src / "params.json", "w"))
    os.rename(src / "tokenizer.model", release / "tokenizer.model")
    tokenizer = (release / "tokenizer.model").read_bytes()

    assert llama_jax.io.tokenizer_file(str(src)) == str(release / "tokenizer.model")
    assert_close(ours(str(src)), ref)
    for to in ("hf", "orbax"):
        out = tmp_path / f"out_{to}"
        cc.convert(str(src), str(out), to=to)
        assert (out / "tokenizer.model").read_bytes() == tokenizer
        assert_close(ours(str(out)), ref)
    assert json.load(open(tmp_path / "out_hf" / "config.json"))["vocab_size"] == 256
    with pytest.raises(ValueError, match="llama-2-7b"):  # the release root is not a checkpoint
        llama_jax.io.detect_format(str(release))


def _tensors(directory):
    from safetensors.torch import load_file
    out = {}
    for fn in sorted(os.listdir(directory)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, fn)))
    return out


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_hf_to_meta_to_hf_bit_exact(tmp_path, model_parallel):
    make_hf(str(tmp_path / "hf"), num_key_value_heads=2, dtype=torch.bfloat16,
            rope_parameters=dict(_LLAMA3, original_max_position_embeddings=8192))
    (tmp_path / "hf" / "tokenizer.model").write_text("IQ== 0\n")
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "meta"), to="meta",
               model_parallel=model_parallel)
    files = sorted(os.listdir(tmp_path / "meta"))
    assert files == sorted(["params.json", "tokenizer.model"] + [
        f"consolidated.{r:02d}.pth" for r in range(model_parallel)])
    cc.convert(str(tmp_path / "meta"), str(tmp_path / "hf2"), to="hf")
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    c1 = json.load(open(tmp_path / "hf" / "config.json"))
    c2 = json.load(open(tmp_path / "hf2" / "config.json"))
    for key in ("hidden_size", "num_key_value_heads", "intermediate_size", "rms_norm_eps"):
        assert c1[key] == c2[key]
    assert c2["rope_scaling"]["factor"] == 8.0 and c2["rope_theta"] == 500000.0


def test_hf_to_sharded_orbax_to_hf_bit_exact(tmp_path):
    """bf16, tied: HF -> Orbax written over a 2x2 mesh -> HF (read back layer slice by layer
    slice) gives the same bits, the same dtype and a tied config."""
    make_hf(str(tmp_path / "hf"), num_key_value_heads=2, dtype=torch.bfloat16,
            tie_word_embeddings=True)
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), to="orbax", mesh="data:2,tensor:2")
    assert llama_jax.checkpoint.load_config(str(tmp_path / "orbax")).param_dtype == "bfloat16"
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "hf2"), to="hf")
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].view(torch.int16),
                                                            b[k].view(torch.int16)), k
    assert json.load(open(tmp_path / "hf2" / "config.json"))["tie_word_embeddings"] is True


def test_orbax_saved_export_to_hf(tmp_path):
    """An export Orbax saved itself (save_params: OCDBT, one chunk spanning all layers) is read
    leaf by leaf, each leaf decoded once, and gives transformers the model's logits."""
    from transformers import LlamaForCausalLM

    model = llama_jax.create(llama_jax.ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4,
                                                   n_kv_heads=2, ffn_dim=192), seed=2)
    llama_jax.checkpoint.save_params(str(tmp_path / "orbax"), model)
    source = cc.OrbaxReader(str(tmp_path / "orbax"))
    assert source.leaves.leaf_major
    wq = [n for n in source.names if n.endswith("q_proj.weight")]
    assert source.names.index(wq[-1]) - source.names.index(wq[0]) == 1  # all L together
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "hf"), to="hf")
    hf, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_close(hf_logits(hf.eval()), np.asarray(model(jnp.asarray(TOKENS))))


# ----------------------------------------------------------------------------------------------
# Bad input: one error naming the file and tensor, and nothing left at the output.


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_hf(str(d / "hf"), num_key_value_heads=2)
    cc.convert(str(d / "hf"), str(d / "meta"), to="meta")
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(path, edit):
    f = safetensors_io.SafetensorsFile(str(path))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    safetensors_io.write(str(path), {k: (v.shape, v.dtype) for k, v in tensors.items()},
                         tensors.__getitem__)


def _config_edit(d):
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 256
    json.dump(cfg, open(d / "config.json", "w"))


def _truncate(path, keep=0.6):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


BAD = {
    "no_config": (lambda d: os.remove(d / "config.json"), "config.json"),
    "config_mismatch": (_config_edit, "mlp.gate_proj.weight"),
    "unknown_tensor": (lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.update(extra=np.zeros(3, np.float32))),
        "model.safetensors: tensor extra"),
    "missing_tensor": (lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "model.layers.1.mlp.up_proj.weight"),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is truncated: tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hf_input(good, tmp_path, case):
    edit, message = BAD[case]
    src = _copy(good / "hf", tmp_path / "in")
    edit(src)
    for to in ("orbax", "meta"):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            cc.convert(str(src), str(tmp_path / "out"), to=to, from_="hf")
        assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no temporary left behind


META_BAD = {
    "no_shards": (lambda d: os.remove(d / "consolidated.00.pth"), "consolidated.00.pth"),
    "params_mismatch": (lambda d: json.dump(dict(json.load(open(d / "params.json")), n_kv_heads=4),
                                            open(d / "params.json", "w")),
                        "consolidated.00.pth: tensor layers.0.attention.wk.weight has shape"),
    "truncated": (lambda d: _truncate(d / "consolidated.00.pth", 0.9),
                  "consolidated.00.pth cannot be read"),
    "tie_claimed": (lambda d: json.dump(dict(json.load(open(d / "params.json")),
                                             tie_word_embeddings=True),
                                        open(d / "params.json", "w")),
                    "says the embeddings are tied but output.weight differs"),
}


@pytest.mark.parametrize("case", list(META_BAD))
def test_bad_meta_input(good, tmp_path, case):
    edit, message = META_BAD[case]
    src = _copy(good / "meta", tmp_path / "in")
    edit(src)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cc.convert(str(src), str(tmp_path / "out"), to="hf", from_="meta")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_existing_output_refused_unless_overwrite(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    r = subprocess.run([sys.executable, "tools/convert_checkpoint.py", f"--input={good / 'hf'}",
                        f"--output={out}", "--to=hf"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "model.safetensors").read_bytes() == b"precious"
    cc.convert(str(good / "hf"), str(out), to="hf", overwrite=True)
    assert llama_jax.io.detect_format(str(out)) == "hf"
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------------------------
# Peak memory: a streaming conversion holds about one tensor, not the model.

_MEASURE = r"""
import json, sys, threading, time
sys.path.insert(0, ".")
# Fixed costs before the baseline: imports, the devices, tracing the abstract model once.
import jax, orbax.checkpoint, tensorstore, torch  # noqa: F401
from llama_jax import model as model_lib
from tools import convert_checkpoint as cc

def anon_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon"))

peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon_kb()); time.sleep(0.0005)

jax.devices()
model_lib.abstract(cc.source_config(sys.argv[1]))
base = anon_kb()
t = threading.Thread(target=sample); t.start()
cc.convert(sys.argv[1], sys.argv[2], to=sys.argv[3])
done[0] = True; t.join()
print(json.dumps(dict(growth=(max(peak[0], anon_kb()) - base) * 1024)))
"""


def _write_many_tensors(directory, n_layers=8, dim=512, ffn=4096, vocab=4096):
    """An HF checkpoint of 9 * 8 + 3 tensors of up to 8 MB (f32), written with our streaming
    writer (no torch): 240 MB in all, 30x the largest tensor."""
    from llama_jax import config as config_lib
    from llama_jax.hf import tensor_names, tensor_shape
    c = llama_jax.ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4,
                              n_kv_heads=4, ffn_dim=ffn)
    os.makedirs(directory)
    json.dump(config_lib.to_hf_config(c), open(os.path.join(directory, "config.json"), "w"))
    rng = np.random.default_rng(0)
    specs = {n: (tensor_shape(c, n), np.dtype(np.float32)) for n in tensor_names(c)}
    safetensors_io.write(os.path.join(directory, "model.safetensors"), specs,
                         lambda n: rng.standard_normal(specs[n][0], np.float32))
    return max(int(np.prod(s)) * 4 for s, _ in specs.values()), sum(
        int(np.prod(s)) * 4 for s, _ in specs.values())


@pytest.mark.slow
def test_streaming_peak_memory(tmp_path):
    """RSS growth (anonymous memory, sampled; memory-mapped input is page cache the kernel can
    drop) stays under 3x the largest tensor in every direction, Orbax in and out included."""
    largest, total = _write_many_tensors(str(tmp_path / "hf"))
    assert total > 20 * largest
    for src, dst, to in [("hf", "meta", "meta"), ("meta", "hf2", "hf"), ("hf", "orbax", "orbax"),
                         ("meta", "orbax2", "orbax"), ("orbax", "hf3", "hf")]:
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / src),
                            str(tmp_path / dst), to], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        growth = json.loads(r.stdout.strip().splitlines()[-1])["growth"]
        assert growth < 3 * largest, (src, to, growth / 2**20, largest / 2**20, total / 2**20)
