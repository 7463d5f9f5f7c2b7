"""int8 weights (llama_jax/quantize.py) against the bf16 model they come from.

The held-in checkpoint: a tiny byte-level model trained here for a few hundred steps on one
paragraph, prompted with pieces of that paragraph, so its greedy continuations are confident
(a random-init model's top two logits are often closer than any quantization error).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax import decode, model as model_lib, quantize
from llama_jax.decode_setup import with_dtype

TEXT = (b"The decode loop generates for a fixed batch of prompts. A checkpoint becomes useful "
        b"to eval, agent and RL tooling when it answers requests as they arrive, many samples "
        b"at once, from the same model and cache code. ")
SEQ = 64


def _trained():
    config = lj.get_config("tiny", vocab_size=259, max_seq_len=256)
    model = model_lib.create(config, seed=0)
    opt = nnx.Optimizer(model, optax.adam(5e-3), wrt=nnx.Param)
    data = np.frombuffer(TEXT * 4, np.uint8).astype(np.int32) + 3

    @nnx.jit
    def step(model, opt, batch):
        def loss(m):
            logits = m(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    rng = np.random.default_rng(0)
    for _ in range(120):
        starts = rng.integers(0, len(TEXT), size=8)
        loss = step(model, opt, jnp.asarray(np.stack([data[s:s + SEQ + 1] for s in starts])))
    assert float(loss) < 0.3  # it has learned the paragraph
    return with_dtype(model, "bfloat16")


@pytest.fixture(scope="module")
def pair():
    bf16 = decode.prepare(_trained(), kernel=False)
    return bf16, quantize.int8(bf16)


def test_int8_weights_are_at_most_55_percent_of_bf16(pair):
    bf16, q = pair
    assert quantize.nbytes(q) <= 0.55 * quantize.nbytes(bf16)
    leaves = jax.tree.leaves(q.layers)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32),
                                         jnp.dtype(jnp.bfloat16)}  # q, scales, norm gains


_logits = jax.jit(decode.logits)


def test_int8_greedy_agrees_with_bf16_over_32_tokens(pair):
    """int8's greedy continuation equals bf16's iff its argmax at every prefix of bf16's
    continuation is bf16's next token: one teacher-forced pass checks all 32 steps."""
    bf16, q = pair
    prompts = [[1] + [b + 3 for b in TEXT[s:s + 12]] for s in (0, 23, 57, 101, 140)]
    out = decode.generate(bf16, prompts, 32, stop_ids=[])
    greedy = np.stack([out.ids(i) for i in range(len(prompts))])
    tokens = jnp.asarray(np.concatenate([np.array(prompts), greedy], axis=1))
    for w in (bf16, q):  # bf16 itself: the teacher-forced pass is the decode loop's math
        picked = np.asarray(jnp.argmax(_logits(w, tokens)[:, 12:-1], axis=-1))
        np.testing.assert_array_equal(picked, greedy)
    # the continuation is the paragraph's: the model, not chance, decides the tokens
    assert bytes(t - 3 for t in greedy[0]) in TEXT * 2


def test_int8_dequantizes_close_to_the_weight():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 16), jnp.float32)
    q = quantize.quantize(w, (0,))
    assert q.q.dtype == jnp.int8 and q.scale.shape == (1, 4, 16)
    err = jnp.abs(q.astype(jnp.float32) - w)
    assert float(jnp.max(err - q.scale / 2)) <= 1e-6  # rounding: within half a step
    assert float(jnp.max(jnp.abs(q.q))) == 127  # every channel uses its full range
