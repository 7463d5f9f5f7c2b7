"""AdamW as LLaMA trains: warmup + cosine schedule, clipping, decoupled weight decay, and
token-weighted gradient accumulation.

LLaMA paper §2.3 (and Llama 2 §2.2): AdamW with β1 0.9, β2 0.95, weight decay 0.1, gradient
clipping at global norm 1.0, 2,000 warmup steps, cosine decay to 10% of the peak learning rate.
Llama 2 states eps 1e-5; the default here is 1e-8 (optax's and PyTorch's), set `eps` to follow
Llama 2 exactly. Decay is decoupled and scaled by the learning rate, p -= lr·wd·p, as in
PyTorch's AdamW that Meta trained with.

    tx = optim.make_optimizer(cfg, nnx.state(model, nnx.Param))   # or logical_axes(model)
    opt_state = tx.init(params)
    (loss, tokens), grads = optim.accumulate_gradients(loss_and_grad, params, batch, 4)

Weight decay skips the RMSNorm gains (logical axes ending in "norm"): decaying them pulls the
normalised activations towards zero, which no LLaMA recipe intends. Embedding tables (first axis
"vocab") are decayed unless `decay_embeddings=False`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx



@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The fields `make_schedule` / `make_optimizer` read; a ConfigDict with them works too.
    The experiment config's `optim` section is built from these fields (llama_jax.experiment),
    all but total_steps, which a run takes from train.steps."""
    peak_lr: float = 3e-4          # LLaMA 7B/13B 3e-4, 33B/65B 1.5e-4 (LLaMA Table 2)
    warmup_steps: int = 2000
    total_steps: int = 100_000     # the cosine ends here at end_lr_fraction * peak_lr
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0         # global-norm clipping; 0 turns it off
    decay_embeddings: bool = True
    accumulation_steps: int = 1    # microbatches per update, gradients weighted by tokens


def make_schedule(cfg: Any) -> optax.Schedule:
    """0 → peak linearly over warmup_steps, then cosine to end_lr_fraction·peak at total_steps:
    lr(s) = peak·s/W for s < W, else end + (peak - end)·(1 + cos(π·(s-W)/(S-W)))/2."""
    if not 0 <= cfg.warmup_steps < cfg.total_steps:
        raise ValueError(f"warmup_steps ({cfg.warmup_steps}) must be in [0, total_steps = "
                         f"{cfg.total_steps}); raise total_steps or lower warmup_steps.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,  # optax counts the warmup inside decay_steps
        end_value=cfg.peak_lr * cfg.end_lr_fraction)


def path_key(path) -> tuple[str, ...]:
    """('layers', 'attn_norm', 'scale') for a jax key path, dropping nnx.Variable's `.value`:
    the same key for a parameter in an nnx.State, a pure dict, or an optimizer state that
    holds a copy of the parameter tree (AdamW's mu and nu)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def axes_by_path(params_or_axes: Any) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Logical axes per parameter path (`path_key`), from nnx Params (with `axes` metadata) or
    an axes tree such as `model.logical_axes(model)`: {('layers', 'attn', 'wq'): ('layers',
    'embed', 'q_heads', 'head_dim'), ...}. The decay mask here and sharding.state_shardings
    look parameters up in it."""
    is_leaf = lambda x: isinstance(x, (nnx.Variable, tuple))  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(params_or_axes, is_leaf=is_leaf)
    out = {}
    for path, leaf in flat:
        axes = leaf.get_metadata().get("axes") if isinstance(leaf, nnx.Variable) else leaf
        if not isinstance(axes, tuple):
            raise ValueError(f"parameter {'/'.join(path_key(path))} has no logical axes; pass "
                             f"nnx.state(model, nnx.Param) or model.logical_axes(model).")
        out[path_key(path)] = axes
    return out


def decay_mask(params_or_axes: Any, decay_embeddings: bool = True) -> Callable[[Any], Any]:
    """A mask function for optax: True where weight decay applies. It looks parameters up by
    path, so it fits nnx.State trees and plain dicts of the same parameters alike."""
    decays = {path: axes[-1] != "norm" and (decay_embeddings or axes[0] != "vocab")
              for path, axes in axes_by_path(params_or_axes).items()}

    def lookup(path, _):
        key = path_key(path)
        if key not in decays:
            raise KeyError(f"parameter {'/'.join(key)} is not among the parameters the "
                           f"optimizer was made for; build it from the same model.")
        return decays[key]
    return lambda params: jax.tree_util.tree_map_with_path(lookup, params)


def make_optimizer(cfg: Any, params_or_axes: Any) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=decay_mask(params_or_axes, cfg.decay_embeddings))
    if not cfg.clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def accumulate_gradients(loss_and_grad_fn: Callable, params: Any, batch: Any,
                         num_microbatches: int) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """Token-weighted gradient accumulation over microbatches, as a pure function.

    loss_and_grad_fn(params, microbatch) -> ((loss_sum, num_tokens), grads of loss_sum), e.g.
    `jax.value_and_grad(f, has_aux=True)` for an f returning (summed token loss, token count).
    Returns ((loss_sum / tokens, tokens), grads / tokens): the mean loss over every target token
    of the batch, so M microbatches of b rows give the same result as one batch of M·b rows.
    Microbatch m takes rows m, m+M, m+2M, ...: with the batch sharded in contiguous blocks over
    devices, each device then holds an equal share of every microbatch (no resharding).
    """
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % num_microbatches:
        raise ValueError(f"batch of {rows} rows does not split into {num_microbatches} "
                         f"microbatches; make the per-step batch a multiple of it.")
    if num_microbatches == 1:
        (loss_sum, tokens), grads = loss_and_grad_fn(params, batch)
        return (loss_sum / tokens, tokens), jax.tree.map(lambda g: g / tokens, grads)
    micro = jax.tree.map(
        lambda x: x.reshape(rows // num_microbatches, num_microbatches, *x.shape[1:])
        .swapaxes(0, 1), batch)

    def body(carry, mb):
        (loss_sum, tokens), grads = loss_and_grad_fn(params, mb)
        acc_loss, acc_tokens, acc_grads = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        return (acc_loss + loss_sum.astype(jnp.float32),
                acc_tokens + jnp.asarray(tokens, jnp.float32), acc_grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, tokens, grads), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grads, params)
    return (loss_sum / tokens, tokens), grads
