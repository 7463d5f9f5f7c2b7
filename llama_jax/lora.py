"""LoRA (Hu et al. 2021): trainable low-rank adapters beside the frozen projections.

A target weight W [L, *in, *out] (wq [L, D, N, H], wo [L, N, H, D], ...) gets the pair
A [L, *in, R] and B [L, R, *out] and a per-layer scale s = alpha / R; its product becomes
x·W + s·(x·A)·B (model.project with `lora`). B starts at zero, so an adapted model computes
exactly what its base does until the first update; A starts as PEFT's (Kaiming-uniform,
bound 1/sqrt(fan_in)).

    model = lora.attach(model, LoraConfig(rank=8, alpha=16))  # adds <w>_lora modules
    graphdef, adapters, frozen = lora.split(model)           # trainable vs frozen state
    merged = lora.merge(model)       # a plain Llama holding W + s·A·B (any export format)
    base = lora.base(model)          # the same base arrays, adapters off (a DPO reference)
    lora.save_peft(directory, model) # adapter_model.safetensors + adapter_config.json

The adapters live in the stacked layer tree next to their weight (`layers/attn/wq_lora/{a, b,
scale}`), so the layer scan, the pipeline stages and the sharding rules carry them like any
parameter: A and B take their weight's logical axes plus "lora_rank" (replicated).
Adapter factors are `Adapter` variables, not nnx.Param: `nnx.state(model, nnx.Param)` (the
params export, the base) never includes them, and training splits them off by type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import hf, safetensors_io
from llama_jax import model as model_lib
from llama_jax.model import Llama

# Our weight name -> (its module in a Block, how many of its dims after L are inputs, the
# Hugging Face module under model.layers.{i}).
TARGETS = {
    "wq": ("attn", 1, "self_attn.q_proj"), "wk": ("attn", 1, "self_attn.k_proj"),
    "wv": ("attn", 1, "self_attn.v_proj"), "wo": ("attn", 2, "self_attn.o_proj"),
    "w_gate": ("mlp", 1, "mlp.gate_proj"), "w_up": ("mlp", 1, "mlp.up_proj"),
    "w_down": ("mlp", 1, "mlp.down_proj"),
}
SUFFIX = "_lora"  # wq's adapter is the module wq_lora beside it


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The experiment config's `lora` section (llama_jax.experiment)."""

    rank: int = 0  # R; 0 = no adapters (full training)
    alpha: float = 16.0  # the update is scaled by alpha / R (PEFT's lora_alpha)
    targets: str = ",".join(TARGETS)  # comma-separated weight names
    seed: int = 0  # initialisation of A

    def target_names(self) -> tuple[str, ...]:
        names = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise ValueError(f"lora.targets {self.targets!r} names {unknown or 'no weight'}; "
                             f"choose among {', '.join(TARGETS)}.")
        return names


def check(cfg: LoraConfig, objective: str = "lm") -> None:
    """One-sentence errors for the lora section of a run of train.objective `objective`."""
    if cfg.rank < 0 or (cfg.rank and cfg.alpha <= 0):
        raise ValueError(f"lora.rank {cfg.rank} must be >= 0 (0 = off) and lora.alpha "
                         f"{cfg.alpha} > 0.")
    if cfg.rank:
        cfg.target_names()
    if cfg.rank and objective not in ("lm", "sft", "dpo"):
        raise ValueError(f"lora.rank applies to the lm, sft and dpo objectives, not "
                         f"{objective}; set --config.lora.rank=0.")


class Adapter(nnx.Variable):
    """A trainable LoRA factor (A or B)."""


class Scale(nnx.Variable):
    """alpha / R, one per layer (stacked like the weights, so the layer scan slices it)."""


class LoRA(nnx.Module):
    """The adapter of one stacked weight w [L, *in, *out] (a Param with logical axes)."""

    def __init__(self, w: nnx.Param, n_in: int, rank: int, alpha: float, rngs: nnx.Rngs):
        layers, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
        axes, dt = w.axes, w.dtype
        bound = 1 / math.sqrt(math.prod(ins))  # PEFT: kaiming_uniform_(a=sqrt(5))
        init = nnx.initializers.uniform(2 * bound)
        self.a = Adapter(init(rngs.params(), (layers, *ins, rank), dt) - bound,
                         axes=(*axes[:1 + n_in], "lora_rank"))
        self.b = Adapter(jnp.zeros((layers, rank, *outs), dt),
                         axes=(axes[0], "lora_rank", *axes[1 + n_in:]))
        self.scale = Scale(jnp.full((layers,), alpha / rank, jnp.float32), axes=(axes[0],))


def attach(model: Llama, cfg: LoraConfig) -> Llama:
    """Adds the adapters of cfg.targets to `model` (in place; returned for chaining)."""
    rngs = nnx.Rngs(cfg.seed)
    for name in cfg.target_names():
        where, n_in, _ = TARGETS[name]
        parent = getattr(model.layers, where)
        setattr(parent, name + SUFFIX,
                LoRA(getattr(parent, name), n_in, cfg.rank, cfg.alpha, rngs))
    return model


def split(model: Llama):
    """(graphdef, adapters, frozen): the Adapter variables (trained) and everything else (the
    base parameters and the scales), as nnx.States with their logical axes."""
    return nnx.split(model, Adapter, ...)


def adapters_of(model: Llama) -> dict:
    """{weight name: its LoRA module} of the adapted weights."""
    out = {}
    for name, (where, _, _) in TARGETS.items():
        adapter = getattr(getattr(model.layers, where), name + SUFFIX, None)
        if adapter is not None:
            out[name] = adapter
    return out


def delta(adapter: LoRA) -> jax.Array:
    """s·A·B [L, *in, *out] in float32: what the adapter adds to its weight."""
    a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
    layers, rank = a.shape[0], a.shape[-1]
    ab = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
    scale = adapter.scale[...].reshape(layers, 1, 1)
    return (scale * ab).reshape(a.shape[:-1] + b.shape[2:])


def base(model: Llama) -> Llama:
    """The model without its adapters: the same base arrays (not copied), the same backend.
    DPO with LoRA uses it as the reference (Llama 3 keeps the reference frozen)."""
    return _plain(model, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _plain(model: Llama, params: dict) -> Llama:
    """A Llama without adapters holding the pure-dict `params` (new Variables: the model's
    own are never shared, so updating one leaves the other as it was)."""
    graphdef = nnx.graphdef(model_lib.abstract(model.config, model.backend, model.parallel))
    return nnx.merge(graphdef, params)


def merge(model: Llama) -> Llama:
    """A plain Llama whose weights are W + s·A·B (in the parameter dtype): export it in any
    format the converter writes. A model without adapters is returned as is."""
    adapters = adapters_of(model)
    if not adapters:
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name, adapter in adapters.items():
        where = TARGETS[name][0]
        w = params["layers"][where][name]
        params["layers"][where][name] = (w.astype(jnp.float32) + delta(adapter)).astype(w.dtype)
    return _plain(model, params)


# ----------------------------------------------------------------------------------------------
# PEFT's layout: the adapter alone, loadable onto the Hugging Face model with
# `peft.PeftModel.from_pretrained(LlamaForCausalLM..., directory)`.

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def peft_tensors(model: Llama) -> dict[str, np.ndarray]:
    """{PEFT name: array} in nn.Linear's [out, in] orientation: lora_A [R, in], lora_B
    [out, R], the in/out dims flattened in the order hf.py flattens the weight's (no
    permutation: both use the half-split RoPE layout)."""
    out = {}
    for name, adapter in adapters_of(model).items():
        _, _, hf_module = TARGETS[name]
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        layers, rank = a.shape[0], a.shape[-1]
        for i in range(layers):
            prefix = f"base_model.model.model.layers.{i}.{hf_module}"
            out[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, rank).T
            out[f"{prefix}.lora_B.weight"] = b[i].reshape(rank, -1).T
    return out


def peft_config(model: Llama, base_model: str = "") -> dict:
    """adapter_config.json: rank, alpha and the HF target modules (scale alpha / R as here)."""
    adapters = adapters_of(model)
    first = next(iter(adapters.values()))
    rank = first.a.shape[-1]
    alpha = round(float(np.asarray(first.scale[...])[0]) * rank, 6)  # alpha / R in float32
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                use_rslora=False, inference_mode=True,
                target_modules=sorted(TARGETS[n][2].split(".")[-1] for n in adapters))


def save_peft(directory: str, model: Llama, *, base_model: str = "",
              dtype: str = "float32", overwrite: bool = False) -> str:
    """Writes the adapters of `model` as PEFT's adapter_model.safetensors + adapter_config.json
    (atomically); base_model goes into base_model_name_or_path. Returns the directory."""
    if not adapters_of(model):
        raise ValueError("the model has no LoRA adapters to save; train with "
                         "--config.lora.rank=R or export the full weights instead.")
    tensors = peft_tensors(model)
    np_dtype = np.dtype(jnp.dtype(dtype))
    specs = {k: (v.shape, np_dtype) for k, v in tensors.items()}
    with hf.atomic_directory(directory, overwrite=overwrite) as tmp:
        safetensors_io.write(os.path.join(tmp, PEFT_WEIGHTS), specs,
                                lambda k: tensors[k], metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
            json.dump(peft_config(model, base_model), f, indent=2)
    return directory


# ----------------------------------------------------------------------------------------------
# Training (llama_jax.train): the adapters are TrainState.params, the base is `frozen`.


def training_split(model: Llama, cfg: LoraConfig):
    """(graphdef, trained, frozen) of an abstract model: with cfg.rank, the model with adapters
    split into its Adapter variables and the rest; without, (graphdef, params, None)."""
    if not cfg.rank:
        return (*nnx.split(model, nnx.Param), None)
    return split(nnx.eval_shape(lambda m: attach(m, cfg), model))


def describe(cfg: LoraConfig, adapters) -> str:
    """The run banner's LoRA line: rank, alpha, targets and the trained parameter count."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    return (f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g} on {', '.join(cfg.target_names())}: "
            f"{n:,} trained parameters, the base frozen")


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_adapters(model_config, cfg: LoraConfig) -> dict:
    """The pure dict of fresh adapters (A random, B zero) of cfg on model_config's model; the
    base initialisation is traced but unused (compiled away)."""
    return nnx.to_pure_dict(nnx.state(attach(model_lib.create(model_config), cfg), Adapter))


def base_params(frozen: dict | None) -> dict | None:
    """The base parameters in the frozen half of `training_split` (its scales dropped): with
    the plain model's graphdef, the model with its adapters off (DPO's reference)."""
    if frozen is None:
        return None
    return {k: base_params(v) if isinstance(v, dict) else v for k, v in frozen.items()
            if not k.endswith(SUFFIX)}


def frozen_values(abstract_frozen, base_params: dict, cfg: LoraConfig) -> dict:
    """The frozen half of `training_split` as a pure dict: the base parameters (a pure dict of
    nnx.state(model, nnx.Param)) and each adapter's scale alpha / R."""
    def fill(tree, base):
        return {k: fill(v, base.get(k, {})) if isinstance(v, dict) else
                base[k] if k in base else jnp.full(v.shape, cfg.alpha / cfg.rank, v.dtype)
                for k, v in tree.items()}
    return fill(nnx.to_pure_dict(abstract_frozen), base_params)
