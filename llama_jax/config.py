"""Model hyperparameters: one frozen dataclass for every LLaMA release.

LLaMA 1, 2, 3, 3.1, 3.2 and 3.3 differ only in these fields (kv heads, RoPE theta and scaling,
vocabulary, FFN multiplier, norm epsilon, tied embeddings). The named sizes below quote their
source: the Meta `params.json` files shipped with each release (mirrored in `llama-models`'
`sku_list.py`) and the papers (LLaMA: Touvron et al. 2023, Table 2; Llama 2: Table 1; Llama 3:
"The Llama 3 Herd of Models", Table 3).

Beside the dataclass: readers and writers for Hugging Face `config.json` (the legacy
`rope_theta` / `rope_scaling` keys and the newer `rope_parameters`) and Meta `params.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ROPE_TYPES = ("default", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (`apply_scaling` in Meta's reference code).

    Wavelengths longer than `original_max_position / low_freq_factor` are divided by `factor`,
    those shorter than `original_max_position / high_freq_factor` are kept, and the band between
    is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the execution options of the model (dtypes, scan, remat).

    `arch()` drops the execution options: two configs with equal `arch()` load each other's
    weights.
    """

    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Meta params.json keeps these instead of ffn_dim; kept so params.json round-trips.
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    bos_id: int = 1
    eos_id: int = 2
    # Execution options: not part of the architecture.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = True
    remat: str = "none"
    name: str = "custom"

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}.")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim {self.dim} is not divisible by n_heads {self.n_heads}: choose a dim that is a "
                "multiple of the head count.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}: grouped-"
                "query attention needs every kv head to serve the same number of query heads.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat policy {self.remat!r}; valid: {', '.join(REMAT_POLICIES)}.")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(
                    f"Unknown {field} {getattr(self, field)!r}; valid: {', '.join(DTYPES)}.")
        if isinstance(self.rope_scaling, dict):  # allow dicts from ml_collections / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def head_dim(self) -> int:  # H
        return self.dim // self.n_heads

    def arch(self) -> dict[str, Any]:
        """The fields that decide parameter shapes and the function computed."""
        d = dataclasses.asdict(self)
        for k in ("param_dtype", "dtype", "scan_layers", "remat", "name", "max_seq_len",
                  "multiple_of", "ffn_dim_multiplier", "bos_id", "eos_id"):
            d.pop(k)
        return d

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """FFN width as Meta's `FeedForward` derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta(name, dim, n_layers, n_heads, n_kv_heads=None, *, multiple_of=256,
          ffn_dim_multiplier=None, **kw) -> ModelConfig:
    return ModelConfig(
        name=name, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads, multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        ffn_dim=meta_ffn_dim(dim, multiple_of, ffn_dim_multiplier), **kw)


# LLaMA 1 (params.json of the 2023 release; paper Table 2): 32k SentencePiece vocab, eps 1e-6.
_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
# Llama 2 (paper Table 1): same vocab, eps 1e-5, 4k context; 70B uses GQA with 8 kv heads.
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
# Llama 3 (Herd paper Table 3): 128,256-token tiktoken vocab, theta 500,000, GQA 8 kv heads.
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
               bos_id=128000, eos_id=128001)
# Llama 3.1 / 3.3: 128k context through RoPE scaling (factor 8; 3.2 uses factor 32).
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
_LLAMA32 = dict(_LLAMA31, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    _meta("llama1-7b", 4096, 32, 32, **_LLAMA1),
    _meta("llama1-13b", 5120, 40, 40, **_LLAMA1),
    _meta("llama1-33b", 6656, 60, 52, **_LLAMA1),
    _meta("llama1-65b", 8192, 80, 64, **_LLAMA1),
    _meta("llama2-7b", 4096, 32, 32, **_LLAMA2),
    _meta("llama2-13b", 5120, 40, 40, **_LLAMA2),
    _meta("llama2-70b", 8192, 80, 64, 8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA2),
    _meta("llama3-8b", 4096, 32, 32, 8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA3),
    _meta("llama3-70b", 8192, 80, 64, 8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA3),
    _meta("llama3.1-8b", 4096, 32, 32, 8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA31),
    _meta("llama3.1-70b", 8192, 80, 64, 8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA31),
    _meta("llama3.1-405b", 16384, 126, 128, 8, multiple_of=4096, ffn_dim_multiplier=1.2,
          **_LLAMA31),
    _meta("llama3.2-1b", 2048, 16, 32, 8, multiple_of=256, ffn_dim_multiplier=1.5, **_LLAMA32),
    _meta("llama3.2-3b", 3072, 28, 24, 8, multiple_of=256, ffn_dim_multiplier=1.0, **_LLAMA32),
    _meta("llama3.3-70b", 8192, 80, 64, 8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA31),
    # Tiny sizes for tests and the CPU experiment.
    ModelConfig(name="tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                ffn_dim=192, max_seq_len=256),
    ModelConfig(name="tiny-llama3", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                ffn_dim=192, rope_theta=500000.0, max_seq_len=512,
                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
    # The benchmark shape of ../shared/bench (30.9M parameters). Layers unrolled: on XLA:CPU a
    # scanned step stacks every residual over L and hoists their converts out of the loop
    # (bench shape: 1.63 s vs 1.04 s per bf16 step, 2.49 vs 2.05 s in f32).
    ModelConfig(name="bench", vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2,
                ffn_dim=1408, max_seq_len=512, scan_layers=False),
]}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named size, optionally with fields replaced (`get_config("tiny", n_layers=4)`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; valid names: {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Reads a `LlamaForCausalLM` config.json dict (legacy or `rope_parameters` dialect)."""
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unknown rope type {rope_type!r} in config.json; valid: {', '.join(ROPE_TYPES)}.")
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position=int(scaling["original_max_position_embeddings"]))
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise ValueError(
            f"config.json has head_dim {head_dim} × {n_heads} heads != hidden_size "
            f"{hf['hidden_size']}; LLaMA models have head_dim = hidden_size / heads.")
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=rope_scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
        eos_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        name=hf.get("_name_or_path") or "hf")


def to_hf_config(c: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """A config.json dict in the legacy dialect that released checkpoints carry.

    transformers reads it into `rope_parameters` itself; both dialects round-trip through
    `from_hf_config`.
    """
    rope_scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope_scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                            high_freq_factor=s.high_freq_factor,
                            original_max_position_embeddings=s.original_max_position)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_dim,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=c.bos_id, eos_token_id=c.eos_id, hidden_act="silu", attention_bias=False,
        mlp_bias=False, attention_dropout=0.0, initializer_range=0.02, torch_dtype=torch_dtype)


def load_hf_config(path: str) -> ModelConfig:
    with open(os.path.join(path, "config.json")) as f:
        return from_hf_config(json.load(f))


# ----------------------------------------------------------------------------------------------
# Meta params.json


def from_meta_params(p: dict[str, Any], *, vocab_size: int | None = None,
                     tie_embeddings: bool = False) -> ModelConfig:
    """Reads Meta's params.json. LLaMA 1 and 2 files carry `vocab_size: -1`; pass V, the rows of
    the checkpoint's embedding tok_embeddings.weight [V, D] (meta.MetaReader does).

    Meta's model always has a separate `output.weight` (Llama 3.2 1B/3B store a copy of the
    embedding there), so params.json cannot say whether embeddings are tied: the converter
    decides from the weights and passes `tie_embeddings`.
    """
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError("params.json has no vocab_size (-1): pass vocab_size, the rows of the "
                             "checkpoint's tok_embeddings.weight.")
        vocab = vocab_size
    dim, multiple_of = p["dim"], p.get("multiple_of", 256)
    mult = p.get("ffn_dim_multiplier")
    llama3 = vocab >= 128000
    scaling = None
    if p.get("use_scaled_rope"):
        # Meta's apply_scaling: factor 8 for 3.1/3.3; Llama 3.2 params.json adds
        # "rope_scaling_factor": 32 (llama-models `ModelArgs.rope_scaling_factor`).
        scaling = RopeScaling(factor=float(p.get("rope_scaling_factor", 8.0)),
                              low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position=8192)
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=p["n_layers"], n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        ffn_dim=meta_ffn_dim(dim, multiple_of, mult), norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=p.get("max_seq_len", 131072 if scaling else (8192 if llama3 else 4096)),
        tie_embeddings=tie_embeddings, multiple_of=multiple_of, ffn_dim_multiplier=mult,
        bos_id=128000 if llama3 else 1, eos_id=128001 if llama3 else 2, name="meta")


def to_meta_params(c: ModelConfig) -> dict[str, Any]:
    """Meta's params.json. Meta stores the FFN width as (multiple_of, ffn_dim_multiplier)."""
    multiple_of, mult = c.multiple_of, c.ffn_dim_multiplier
    if meta_ffn_dim(c.dim, multiple_of, mult) != c.ffn_dim:
        # A width no preset pair gives: round int(8D/3) up to exactly ffn_dim.
        if int(8 * c.dim / 3) > c.ffn_dim:
            raise ValueError(
                f"ffn_dim {c.ffn_dim} is below 8·dim/3 = {int(8 * c.dim / 3)}; Meta's params.json "
                "cannot express it.")
        multiple_of, mult = c.ffn_dim, None
    p = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
             vocab_size=c.vocab_size, multiple_of=multiple_of, ffn_dim_multiplier=mult,
             norm_eps=c.norm_eps, rope_theta=c.rope_theta,
             use_scaled_rope=c.rope_scaling is not None)
    if c.rope_scaling is not None:
        s = c.rope_scaling
        if (s.low_freq_factor, s.high_freq_factor, s.original_max_position) != (1.0, 4.0, 8192):
            raise ValueError(
                "Meta's params.json fixes RoPE scaling at low 1, high 4, original context 8192; "
                f"this config has {s}. Export it to Hugging Face format instead.")
        p["rope_scaling_factor"] = s.factor
    if mult is None:
        p.pop("ffn_dim_multiplier")
    return p
