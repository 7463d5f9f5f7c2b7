"""Meta checkpoints against Meta's reference implementation (llama_models.llama3.model with
fairscale model parallelism on a gloo process group, CPU, float32)."""

import json
import os
import socket
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax import checkpoint, meta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tools import convert_checkpoint as cc  # noqa: E402

TOKENS = np.random.default_rng(1).integers(0, 250, size=(2, 10))
# Llama-2 style: multi-head, theta 1e4, no scaling. Llama-3.1 style: GQA, theta 5e5, scaled RoPE
# (the reference hard-codes factor 8 and original context 8192 in `apply_scaling`).
PARAMS = {
    "llama2": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, multiple_of=32,
                   norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=False),
    "llama3.1": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                     ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                     use_scaled_rope=True),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fairscale_world():
    """Model parallelism of size 1 in this process (what Meta's `Llama.build` sets up)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield


def reference(params, state_dict=None, seed=0):
    """Meta's Transformer (float32, CPU); random weights unless a state dict is given."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    model = Transformer(ModelArgs(max_seq_len=32, max_batch_size=2, **params))
    if state_dict is None:
        g = torch.Generator().manual_seed(seed)
        state_dict = {}
        for k, v in model.state_dict().items():
            if k.endswith("norm.weight"):
                state_dict[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
            elif not k.endswith(("cache_k", "cache_v")):
                state_dict[k] = 0.1 * torch.randn(v.shape, generator=g)
    model.load_state_dict(state_dict, strict=False)
    missing = set(model.state_dict()) - set(state_dict)
    assert all(k.endswith(("cache_k", "cache_v")) for k in missing), missing
    return model, state_dict


def ref_logits(model):
    return model(torch.as_tensor(TOKENS), start_pos=0).float().numpy()


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def write_meta_like_meta(directory, params, state_dict):
    """A checkpoint as Meta ships it: params.json + torch.save'd consolidated.00.pth."""
    os.makedirs(directory)
    json.dump(params, open(os.path.join(directory, "params.json"), "w"))
    torch.save(state_dict, os.path.join(directory, "consolidated.00.pth"))


def test_rope_permute_is_the_interleaved_to_half_split_reordering():
    # Head of H = 8 rows [r0 i0 r1 i1 r2 i2 r3 i3] (Meta) -> [r0 r1 r2 r3 i0 i1 i2 i3] (HF).
    w = np.arange(2 * 8)[:, None] * np.ones((1, 3))
    hs = meta.rope_permute(w, 2, to_half_split=True)
    np.testing.assert_array_equal(hs[:8, 0], [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(hs[8:, 0], [8, 10, 12, 14, 9, 11, 13, 15])
    np.testing.assert_array_equal(meta.rope_permute(hs, 2, to_half_split=False), w)


@pytest.mark.parametrize("style", list(PARAMS))
def test_meta_to_orbax_matches_reference(fairscale_world, tmp_path, style):
    model, sd = reference(PARAMS[style])
    write_meta_like_meta(str(tmp_path / "meta"), PARAMS[style], sd)
    assert_close(np.asarray(llama_jax.load(str(tmp_path / "meta"))(jnp.asarray(TOKENS))),
                 ref_logits(model))
    cc.convert(str(tmp_path / "meta"), str(tmp_path / "orbax"), to="orbax")
    assert not checkpoint.load_config(str(tmp_path / "orbax")).tie_embeddings
    assert_close(np.asarray(llama_jax.load(str(tmp_path / "orbax"))(jnp.asarray(TOKENS))),
                 ref_logits(model))


@pytest.mark.parametrize("style", list(PARAMS))
def test_orbax_to_meta_loads_in_reference(fairscale_world, tmp_path, style):
    c = llama_jax.config.from_meta_params(PARAMS[style])
    ours = llama_jax.create(c, seed=3)
    checkpoint.save_params(str(tmp_path / "orbax"), ours)
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "meta"), to="meta")
    sd = torch.load(str(tmp_path / "meta" / "consolidated.00.pth"), weights_only=True)
    assert json.load(open(tmp_path / "meta" / "params.json"))["use_scaled_rope"] == (
        style == "llama3.1")
    model, _ = reference(json.load(open(tmp_path / "meta" / "params.json")), sd)
    assert_close(ref_logits(model), np.asarray(ours(jnp.asarray(TOKENS))))


def test_tied_embeddings(fairscale_world, tmp_path):
    """Llama 3.2 1B/3B tie the output to the embedding; Meta's checkpoint stores a copy as
    output.weight. Read as tied: the Orbax export has no lm_head and gives the reference's
    logits, and its 2-way Meta and Hugging Face outputs are tied too (transformers loads with
    no missing keys). Written back, Meta's reference loads it and gives the same logits."""
    from transformers import LlamaForCausalLM

    params = PARAMS["llama3.1"]
    _, sd = reference(params, seed=11)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    model, _ = reference(params, sd)
    write_meta_like_meta(str(tmp_path / "meta"), params, sd)
    cc.convert(str(tmp_path / "meta"), str(tmp_path / "orbax"), to="orbax")
    assert checkpoint.load_config(str(tmp_path / "orbax")).tie_embeddings
    assert not os.path.exists(tmp_path / "orbax" / "params" / "lm_head")
    assert_close(np.asarray(llama_jax.load(str(tmp_path / "orbax"))(jnp.asarray(TOKENS))),
                 ref_logits(model))
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "meta2"), to="meta", model_parallel=2)
    cc.convert(str(tmp_path / "meta2"), str(tmp_path / "hf"), to="hf")
    assert json.load(open(tmp_path / "hf" / "config.json"))["tie_word_embeddings"] is True
    hf, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert_close(hf.eval()(torch.as_tensor(TOKENS)).logits.float().numpy(), ref_logits(model))
    cc.convert(str(tmp_path / "hf"), str(tmp_path / "meta3"), to="meta")
    sd3 = torch.load(str(tmp_path / "meta3" / "consolidated.00.pth"), weights_only=True)
    assert torch.equal(sd3["output.weight"], sd3["tok_embeddings.weight"])
    back, _ = reference(json.load(open(tmp_path / "meta3" / "params.json")), sd3)
    assert_close(ref_logits(back), ref_logits(model))


def test_two_way_model_parallel(fairscale_world, tmp_path):
    """Our 2-shard writer splits as fairscale does: each shard equals the reference's own slice
    of the merged weights, and reading the shards back merges to the same model."""
    params = PARAMS["llama3.1"]
    model, sd = reference(params, seed=5)
    write_meta_like_meta(str(tmp_path / "meta1"), params, sd)
    cc.convert(str(tmp_path / "meta1"), str(tmp_path / "meta2"), to="meta", model_parallel=2,
               embedding_split=0)
    shards = [torch.load(str(tmp_path / "meta2" / f"consolidated.0{r}.pth"), weights_only=True)
              for r in range(2)]
    # fairscale: ColumnParallelLinear / VocabParallelEmbedding keep rows, RowParallelLinear cols.
    for name, full in sd.items():
        dim = (1 if name.endswith(("wo.weight", "w2.weight")) else
               None if name.endswith("norm.weight") else 0)
        for r, shard in enumerate(shards):
            want = full if dim is None else torch.chunk(full, 2, dim=dim)[r]
            assert torch.equal(shard[name], want), (name, r)
    assert_close(np.asarray(llama_jax.load(str(tmp_path / "meta2"))(jnp.asarray(TOKENS))),
                 ref_logits(model))


_RANK_SCRIPT = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer
ckpt, rank, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
fs_init.initialize_model_parallel(2)
params = json.load(open(os.path.join(ckpt, "params.json")))
model = Transformer(ModelArgs(max_seq_len=32, max_batch_size=2, **params))
sd = torch.load(os.path.join(ckpt, f"consolidated.0{rank}.pth"), weights_only=True)
missing, unexpected = model.load_state_dict(sd, strict=False)
assert not unexpected and all(k.endswith(("cache_k", "cache_v")) for k in missing), missing
logits = model(torch.as_tensor(np.load(out + ".tokens.npy")), start_pos=0).float().numpy()
if rank == 0:
    np.save(out, logits)
dist.barrier()  # both ranks done before gloo's threads are torn down (else: abort at exit)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_way_model_parallel_reference_processes(tmp_path):
    """Meta's reference run as 2 model-parallel gloo processes on our 2-shard checkpoint gives
    our logits."""
    import subprocess
    c = llama_jax.config.from_meta_params(PARAMS["llama3.1"])
    ours = llama_jax.create(c, seed=7)
    checkpoint.save_params(str(tmp_path / "orbax"), ours)
    cc.convert(str(tmp_path / "orbax"), str(tmp_path / "meta"), to="meta", model_parallel=2,
               embedding_split=0)
    out = str(tmp_path / "logits.npy")
    np.save(out + ".tokens.npy", TOKENS)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "meta"), str(r),
                               port, out], stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert_close(np.load(out), np.asarray(ours(jnp.asarray(TOKENS))))
