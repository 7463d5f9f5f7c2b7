"""Post-training objectives (Llama 3 paper §4): SFT, DPO with Llama 3's two changes, and the
reward model's Bradley-Terry loss, as pure functions of arrays.

    train.objective  data (llama_jax.chat_data)   loss
    "lm"             text documents (data.py)     train.loss_fn: mean CE over loss_mask
    "sft"            packed conversations         the same: loss_mask = the labels
    "dpo"            preference pairs             dpo_objective (reference: batch["ref_logprobs"])
    "reward"         preference pairs             reward_objective (a reward.RewardModel)

An objective is `fn(params, graphdef, batch) -> (loss, (tokens, metrics))`, differentiated by
train.train_step. Preference batches (chat_data.pack_pairs) give each token its `sequence`
(2·pair + 0 chosen / 1 rejected, -1 padding) and mark each sequence's `last` token; per-
sequence sums are segment sums over `sequence`, so pairs may share rows with other pairs.

DPO (Rafailov et al. 2023) as Llama 3 trains it: the sequence log-prob π of a response sums
the log-probabilities of its content tokens only (no header, no end-of-turn: `loss_mask`),
and an NLL term on the chosen responses is added:

    h = β·((π_c − ref_c) − (π_r − ref_r)),   loss = mean_pairs softplus(−h) + nll_coef·NLL,

NLL the mean over the batch's chosen content tokens of −log p. The reference log-probs come
in the batch (`ref_logprobs` [B, T], per target token), computed by a `reference` callable
outside the differentiated step, so no gradient reaches the reference and a caller may
supply any reference: a frozen copy (default), another checkpoint, or the policy with its
LoRA adapters off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import reward

OBJECTIVES = ("lm", "sft", "dpo", "reward")
DATA = {"lm": "text", "sft": "sft", "dpo": "preference", "reward": "preference"}
LOGIT_TOKENS = 1024  # tokens per row projected to logits at once (as train.LOSS_TOKENS)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The `dpo` section of the experiment config (Llama 3 paper §4.1.4)."""
    beta: float = 0.1  # β of the DPO loss
    nll_coef: float = 0.2  # coefficient of the NLL term on the chosen responses
    reference: str = ""  # reference checkpoint (HF, Meta or Orbax); "" = train.init_from, frozen


# ----------------------------------------------------------------------------------------------
# Pieces.


def token_logprobs(unembed: Callable, x: jax.Array, targets: jax.Array,
                   chunk: int = LOGIT_TOKENS) -> jax.Array:
    """log p(targets) [B, T] float32 from final-norm outputs x [B, T, D]. The [B, T, V] logits
    are made `chunk` tokens per row at a time under remat, strided as train.loss_fn does."""
    b, t, _ = x.shape
    n = max(1, t // max(chunk, 1))
    while t % n:
        n -= 1

    def part(x, targets):
        logits = unembed(x)  # [B, T/n, V] f32
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    if n == 1:
        return part(x, targets)
    split = lambda a: jnp.moveaxis(a.reshape(b, t // n, n, *a.shape[2:]), 2, 0)  # noqa: E731
    out = jax.lax.map(lambda xs: jax.checkpoint(part)(*xs), (split(x), split(targets)))
    return jnp.moveaxis(out, 0, 2).reshape(b, t)  # chunk j held tokens j, j + n, ...


def sequence_sums(values: jax.Array, sequence: jax.Array, n: int) -> jax.Array:
    """Σ of values [B, T] over the tokens of each sequence id 0..n-1 ([B, T], -1 = none): [n]."""
    ids = jnp.where(sequence >= 0, sequence, n).reshape(-1)
    return jax.ops.segment_sum(values.reshape(-1), ids, num_segments=n + 1)[:n]


def policy_logprobs(params, graphdef, batch) -> jax.Array:
    """log p(target) [B, T] of the model `nnx.merge(graphdef, params)` on a batch."""
    model = nnx.merge(graphdef, params)
    x = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_logprobs(model.unembed, x, batch["targets"])


def dpo_terms(logprobs, ref_logprobs, batch, *, beta: float, nll_coef: float):
    """(loss, metrics) of DPO + NLL from per-token log-probs [B, T] of policy and reference."""
    mask = batch["loss_mask"].astype(jnp.float32)
    n_seq = batch["sequence"].shape[0]  # 2·pairs rows: one id per row (chat_data.pack_pairs)
    pi = sequence_sums(logprobs * mask, batch["sequence"], n_seq)
    ref = sequence_sums(ref_logprobs * mask, batch["sequence"], n_seq)
    h = beta * ((pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2]))  # [pairs]
    dpo = jnp.mean(jax.nn.softplus(-h))  # -log σ(h)
    chosen = mask * ((batch["sequence"] % 2) == 0) * (batch["sequence"] >= 0)
    nll = -jnp.sum(logprobs * chosen) / jnp.maximum(jnp.sum(chosen), 1.0)
    loss = dpo + nll_coef * nll
    return loss, dict(dpo_loss=dpo, nll_loss=nll, reward_accuracy=jnp.mean(h > 0),
                      margin=jnp.mean(h), tokens=jnp.sum(mask))


def dpo_objective(params, graphdef, batch, *, beta: float, nll_coef: float):
    """The DPO objective on a preference batch carrying `ref_logprobs` (see `reference`)."""
    logprobs = policy_logprobs(params, graphdef, batch)
    loss, metrics = dpo_terms(logprobs, jax.lax.stop_gradient(batch["ref_logprobs"]), batch,
                              beta=beta, nll_coef=nll_coef)
    return loss, (metrics.pop("tokens"), metrics)


def bradley_terry_terms(rewards_tok, batch):
    """(loss, metrics) of the Bradley-Terry loss mean_pairs −log σ(r_c − r_r), each sequence's
    reward its token reward [B, T] at its `last` token."""
    n_seq = batch["sequence"].shape[0]
    r = sequence_sums(rewards_tok * batch["last"], batch["sequence"], n_seq)
    d = r[0::2] - r[1::2]
    return jnp.mean(jax.nn.softplus(-d)), dict(reward_accuracy=jnp.mean(d > 0),
                                                margin=jnp.mean(d))


def reward_objective(params, graphdef, batch):
    """The reward model's objective (graphdef: a reward.RewardModel's)."""
    model = nnx.merge(graphdef, params)
    h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    loss, metrics = bradley_terry_terms(reward.token_rewards(h, model.score[...]), batch)
    return loss, (jnp.sum(batch["last"]).astype(jnp.float32), metrics)


def objective(config) -> Callable | None:
    """The step's objective for config.train.objective; None: train.loss_fn (lm, sft)."""
    name = config.train.objective
    if name == "dpo":
        return functools.partial(dpo_objective, beta=config.dpo.beta,
                                 nll_coef=config.dpo.nll_coef)
    return reward_objective if name == "reward" else None


def reference(graphdef, ref_params: Any) -> Callable:
    """batch -> ref_logprobs [B, T]: the frozen reference's per-token log-probs, jitted."""
    fn = jax.jit(lambda p, b: jax.lax.stop_gradient(policy_logprobs(p, graphdef, b)))
    return lambda batch: fn(ref_params, batch)


def with_reference(step_fn: Callable, reference_fn: Callable) -> Callable:
    """step_fn(state, batch) that first adds `ref_logprobs` = reference_fn(batch)."""
    return lambda state, batch: step_fn(state, {**batch, "ref_logprobs": reference_fn(batch)})
