"""Backends: what one kind of device swaps into the model's plain math, as one frozen value.

    backend = backends.get("auto")          # or "plain", "cpu"; mesh.backend in the configs
    model = llama_jax.create(config, backend=backend)

model.py and attention.py are the paper's math in plain JAX (einsums, autodiff); that is the
`plain` backend, and it runs on every device. A backend replaces some of its pieces with forms
that are faster on one device kind, each tested equal to the plain form:

- `einsum(spec, x, w, out_dtype)`: a weight product (model.project)
- `norm_gain(y, scale)`: RMSNorm's gain
- `rope_table(positions, inv_freq)`: RoPE's cos/sin table
- `attention(q, k, v, positions, segment_ids)`: training self-attention (mesh.attention picks
  one of `attentions`)
- `swiglu(x, w_gate, w_up)`: the MLP's gated product
- `row_sum(y)`: the sum over tensor ranks of wo's and w_down's partial products, where the
  layers run on local shards (pipeline_manual.py); None where XLA partitions them
- `fused_update(cfg, params)`: an optimizer update equal to optim.make_optimizer's, applied in
  one pass per parameter, or None
- `decode_pack(w)` / `decode_block(...)`: weights packed once for decoding, and a whole block
  of a one-token decode step in one call
- `decode_attention(q, kv, cache, positions, segment_ids)`: attention of a decode step over the
  KV cache (a Pallas kernel, decode_attention.py; None where it leaves a case to the plain
  form); `with_decode_attention(name)` picks it: `auto` is ragged_tpu on a TPU, ragged_gpu on
  a GPU, the plain form elsewhere; a kernel named on a CPU runs interpreted

Process set-up that must come before JAX starts (the cpu backend's host memory policy) is
`prepare_host(name)`, called by the launchers with the configured name.

A backend is chosen once, from the run's config, and passed down: the model holds it (it is
part of the model's graph definition, so jit traces each backend separately); nothing reads a
module global at trace time. `cpu` lives in backends/cpu/, `tpu` (Pallas splash attention) in
tpu.py and `gpu` (Pallas GPU flash attention) in gpu.py, each imported only when selected.
The two accelerator kernels are also attentions of every backend (`KERNELS`: mesh.attention=
splash or pallas_gpu); on a CPU they run the same kernel code in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
from typing import Callable

from llama_jax import attention

NAMES = ("auto", "plain", "cpu", "tpu", "gpu")

# Attention kernels any backend can run: mesh.attention name -> (module, the platform it is
# compiled for). Elsewhere than that platform they run only on a CPU, interpreted.
KERNELS = {"splash": ("llama_jax.backends.tpu", "tpu"),
           "pallas_gpu": ("llama_jax.backends.gpu", "gpu")}


def _platform() -> str:
    import jax  # noqa: PLC0415
    return jax.default_backend()


def kernels_here() -> tuple[str, ...]:
    """The KERNELS that run on this process's platform (both, interpreted, on a CPU)."""
    here = _platform()
    return tuple(k for k, (_, p) in KERNELS.items() if here in (p, "cpu"))


def kernel_attention(name: str) -> Callable:
    """The attention function of KERNELS[name]; on a CPU, in interpret mode."""
    module, platform = KERNELS[name]
    if name not in kernels_here():
        raise ValueError(f"mesh.attention={name!r} is a {platform.upper()} kernel but this "
                         f"process runs on {_platform()}; valid here: auto, "
                         f"{', '.join((*attention.IMPLS, *kernels_here()))}.")
    interpret = _platform() == "cpu"
    return importlib.import_module(module).make(interpret).attentions[0][1]


@dataclasses.dataclass(frozen=True)
class Backend:
    """The pieces a backend swaps in; None keeps the plain form of model.py / attention.py."""

    name: str = "plain"
    einsum: Callable | None = None
    norm_gain: Callable | None = None
    rope_table: Callable | None = None
    attention: Callable | None = None  # None: attention.IMPLS[default_attention]
    # Attention implementations beyond attention.IMPLS, as (name, function) pairs, and the one
    # `auto` picks.
    attentions: tuple[tuple[str, Callable], ...] = ()
    default_attention: str = "reference"
    swiglu: Callable | None = None
    row_sum: Callable | None = None
    fused_update: Callable | None = None
    decode_pack: Callable | None = None
    decode_block: Callable | None = None
    decode_attention: Callable | None = None  # None: attention.dot_product_attention + mask

    def with_decode_attention(self, name: str = "auto") -> Backend:
        """This backend with decode attention `name`: auto, plain or a decode_attention.KERNELS
        name (compiled on its platform, interpreted on a CPU)."""
        from llama_jax.backends import decode_attention as da  # noqa: PLC0415
        here = _platform()
        if name == "auto":
            name = {"tpu": "ragged_tpu", "gpu": "ragged_gpu"}.get(here, "plain")
        if name == "plain":
            return dataclasses.replace(self, decode_attention=None)
        if name not in da.KERNELS or here not in (da.KERNELS[name], "cpu"):
            valid = ("auto", "plain", *(k for k, p in da.KERNELS.items() if here in (p, "cpu")))
            raise ValueError(f"decode attention {name!r} cannot run on {here}; valid here: "
                             f"{', '.join(valid)}.")
        return dataclasses.replace(self, decode_attention=da.make(name, here == "cpu"))

    def with_attention(self, name: str = "auto") -> Backend:
        """This backend with training attention `name`: auto (default_attention), a key of
        attention.IMPLS or one of `attentions`."""
        name = self.default_attention if name == "auto" else name
        impls = {**attention.IMPLS, **dict(self.attentions)}
        if name in KERNELS and name not in impls:
            return dataclasses.replace(self, attention=kernel_attention(name))
        if name not in impls:
            valid = (*impls, *(k for k in kernels_here() if k not in impls))
            raise ValueError(f"mesh.attention={name!r} is not available on the {self.name} "
                             f"backend; valid: auto, {', '.join(valid)}.")
        return dataclasses.replace(self, attention=impls[name])

    def attend(self, q, k, v, positions, segment_ids):
        """Training self-attention of q [B, T, N, H], k, v [B, T, K, H]."""
        fn = self.attention or attention.IMPLS[self.default_attention]
        return fn(q, k, v, positions, segment_ids)

    def row_parallel(self, y):
        """A row-parallel product's output (wo, w_down): row_sum(y), or y as it is."""
        return y if self.row_sum is None else self.row_sum(y)


PLAIN = Backend()


def _cpu() -> Backend:
    return importlib.import_module("llama_jax.backends.cpu").make()


def _why_not(name: str) -> str | None:
    """One sentence on why backend `name` cannot run in this process, or None."""
    here = _platform()
    if name in ("cpu", "tpu", "gpu") and here != name:
        kernel = {"tpu": " (its attention runs here as --config.mesh.attention=splash)",
                  "gpu": " (its attention runs here as --config.mesh.attention=pallas_gpu)",
                  }.get(name, "") if here == "cpu" else ""
        return (f"the {name} backend needs JAX's {name.upper()} platform but this process "
                f"runs on {here}; use --config.mesh.backend=auto or plain{kernel}")
    return None


@functools.cache
def get(name: str = "auto", attention: str = "auto", decode_attention: str = "auto") -> Backend:
    """The backend `name` (one of NAMES) with training attention `attention` and decode
    attention `decode_attention` (Backend.with_decode_attention).

    `auto` picks the backend named after JAX's default platform (cpu, tpu, gpu; `plain`
    on any other), with one log line saying what it chose.
    Raises ValueError, in one sentence, for an unknown name or a backend that cannot run here.
    """
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(NAMES)}.")
    if name == "auto":
        import jax  # noqa: PLC0415
        platform = jax.default_backend()
        name = platform if platform in ("cpu", "tpu", "gpu") else "plain"
        logging.info("backend auto: %s (JAX platform %s).", name, platform)
    reason = _why_not(name)
    if reason:
        raise ValueError(reason[0].upper() + reason[1:] + ".")
    if name in ("tpu", "gpu"):
        backend = importlib.import_module(f"llama_jax.backends.{name}").make()
    else:
        backend = _cpu() if name == "cpu" else PLAIN
    return backend.with_attention(attention).with_decode_attention(decode_attention)


def for_target(platform: str, attention_name: str = "auto") -> Backend:
    """The backend a run on `platform` (tpu, gpu, cpu) uses, for compiling its step ahead of
    time on this machine (tools/plan.py): the plain math (never this host's cpu pieces) with
    the attention `auto` picks there (splash on tpu, pallas_gpu on gpu, reference on cpu) or
    `attention_name`. Kernels are compiled for a tpu target (libtpu topology devices); a gpu
    target's kernel is an opaque stand-in with its inputs and outputs (gpu.planned_mha: the
    planner costs it), a cpu target's runs interpreted."""
    name = {"tpu": "splash", "gpu": "pallas_gpu"}.get(platform, "reference")
    name = name if attention_name == "auto" else attention_name
    if name not in KERNELS:  # its default too: plan.build compiles the default (`auto`)
        return dataclasses.replace(PLAIN.with_attention(name), default_attention=name)
    module, kernel_platform = KERNELS[name]
    if platform not in (kernel_platform, "cpu"):
        raise ValueError(f"mesh.attention={name!r} is a {kernel_platform.upper()} kernel; a "
                         f"{platform} target takes auto, {', '.join(attention.IMPLS)} or "
                         f"{'splash' if platform == 'tpu' else 'pallas_gpu'}.")
    kernel = importlib.import_module(module)
    made = kernel.make(planned=True) if platform == "gpu" else kernel.make(platform != "tpu")
    fn = made.attentions[0][1]
    return dataclasses.replace(PLAIN, attentions=((name, fn),), default_attention=name)


def prepare_host(name: str = "auto") -> None:
    """Process set-up of the backend `name` would choose, before JAX starts its threads: on a
    CPU host (no TPU/GPU device files) the cpu backend keeps freed host memory for reuse
    (backends/cpu/host_memory.py). Does nothing for other backends."""
    if name == "plain" or os.environ.get("LLAMA_JAX_RETAIN_HOST_MEMORY", "1") == "0":
        return
    host_memory = importlib.import_module("llama_jax.backends.cpu.host_memory")
    if name == "cpu" or not host_memory.has_accelerator():
        host_memory.retain_freed_memory()
