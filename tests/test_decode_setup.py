"""decode_setup: buckets, padding, stop ids, cache placement and input checks, without
compiling anything (the decode loop itself is tested in test_decode.py)."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import config as config_lib
from llama_jax import decode_setup
from llama_jax.sampling import SamplingParams

CFG = config_lib.get_config("tiny")  # V 512, K 2 kv heads, 256 positions


@pytest.mark.parametrize("n, want", [(1, 16), (16, 16), (17, 32), (60, 64), (64, 64),
                                     (65, 128), (1000, 1024)])
def test_bucket_is_the_next_power_of_two_from_16(n, want):
    assert decode_setup.bucket(n) == want
    assert decode_setup.bucket(n, minimum=1) == max(1, 1 << (n - 1).bit_length())


def test_pad_batch_right_pads_and_fills_the_data_axis():
    tokens, lengths = decode_setup.pad_batch([[5, 6, 7], [8]], 4, multiple=4)
    assert np.asarray(tokens).tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0] * 4, [0] * 4]
    assert np.asarray(lengths).tolist() == [3, 1, 1, 1]  # filler rows: one token each
    assert np.asarray(decode_setup.pad_batch([[1]] * 3, 2, 3)[0]).shape == (3, 2)


def test_stop_ids_are_padded_with_an_id_no_token_has():
    assert decode_setup.stop_array([2, 9]).tolist() == [2, 9] + [-1] * 6


@pytest.mark.parametrize("tensor, heads", [(2, "tensor"), (4, None)])
def test_cache_heads_split_over_tensor_only_when_it_divides_them(tensor, heads):
    mesh = decode_setup.make_mesh(2, tensor)
    s = decode_setup.cache_shardings(mesh, CFG)
    assert s["k"].spec == s["v"].spec == P(None, "data", None, heads, None)
    assert s["pos"].spec == s["seg"].spec == P("data", None)


def test_mesh_larger_than_the_machine_is_refused():
    with pytest.raises(ValueError, match="A 4×4 mesh needs 16 devices but only 8 exist"):
        decode_setup.make_mesh(4, 4)


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[[1, 2], [3, -1]]), "Prompt 1 has token id -1 outside"),
    (dict(prompts=[[1] * 200], max_new_tokens=57), "200 tokens plus 57 new tokens does not fit"),
    (dict(stop_ids=[2] * 9), "At most 8 stop ids"),
    (dict(sampling=SamplingParams(top_k=513)), "top_k must be in"),
])
def test_check_inputs_one_sentence_each(kw, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=8, sampling=SamplingParams(), stop_ids=[2],
                max_len=256)
    decode_setup.check_inputs(CFG, **args)  # the unchanged arguments are fine
    with pytest.raises(ValueError, match=match):
        decode_setup.check_inputs(CFG, **dict(args, **kw))
    decode_setup.check_inputs(CFG, **dict(args, prompts=[[1] * 200], max_new_tokens=56))
