"""The lm-evaluation-harness backend `llama_jax`: its model interface on the jitted model.

    python tools/lm_eval.py --model llama_jax --model_args checkpoint=DIR,dtype=bfloat16 \\
        --tasks hellaswag --batch_size 8

Importing this module registers the backend (lm_eval's `register_model`). It follows the
conventions of lm_eval's `hf` backend (lm_eval/models/huggingface.py), so a checkpoint scores
the same here as its Hugging Face export does there:
- text is encoded with BOS first (HF's `add_special_tokens` default), except a text that already
  starts with the BOS string; an empty context is the prefix token (BOS) alone;
- context/continuation split, trailing spaces moved into the continuation (`TemplateLM`);
- a row longer than the context keeps its last max_length + 1 tokens, with a warning;
- rolling log-likelihood in lm_eval's disjoint windows of max_length tokens after the prefix.

Every forward pass runs on rows padded to (batch_size, a power-of-two bucket of the length), so
new lengths reuse compiled programs; generation is decode.generate (its own buckets) on batches
padded to batch_size. Stop strings end a row's text; a stop string that is one token also stops
the row's decoding early.

Axis letters: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import decode, io
from llama_jax import tokenizer as tokenizer_lib
from llama_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


@jax.jit
def score(weights: decode.Weights, tokens, targets, segments):
    """(log p(targets) [B, T] f32, targets are the argmax [B, T]) for tokens [B, T] (segment 0:
    padding, scored but ignored by the caller)."""
    logits = decode.logits(weights, tokens, segments, weights.embed.dtype)  # [B, T, V] f32
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits, axis=-1) == targets


@register_model("llama_jax")
class LlamaJaxLM(TemplateLM):
    """model_args: checkpoint (any directory llama_jax.load reads), dtype (default: as saved),
    batch_size (rows per forward pass, default 8), max_length (default: the config's
    max_seq_len), tensor (split the weights over this many local devices, default 1),
    tokenizer (a tokenizer.model or "byte"; default: the checkpoint's own)."""

    def __init__(self, checkpoint: str, dtype: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, tensor: int = 1, tokenizer: str | None = None,
                 max_batch_size=None, device=None):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer (this backend has no "
                             f"'auto'), got {batch_size!r}.")
        spec = tokenizer or io.tokenizer_file(checkpoint) or checkpoint_lib.tokenizer_spec(
            checkpoint)
        if spec is None:
            raise ValueError(f"{checkpoint} stores no tokenizer; pass tokenizer=PATH in "
                             "--model_args.")
        self.tokenizer = tokenizer_lib.load_tokenizer(spec)
        model = io.load(checkpoint)
        decode.check_vocab(self.tokenizer.vocab_size, model.config)
        if dtype:
            model = decode.with_dtype(model, dtype)
        if int(tensor) > 1:
            model = decode.shard(model, decode.make_mesh(1, int(tensor)))
        self.weights = decode.prepare(model)
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_seq_len)
        self.checkpoint = checkpoint

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """As lm_eval's, but a key of --model_args wins over the same command-line option
        (lm_eval's own passes both: batch_size=8 in --model_args was a TypeError)."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    # ------------------------------------------------------------------------------------------
    # Tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        bos_text = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            string, add_special_tokens = string[len(bos_text):], True
        bos = True if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos, eos=False)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------------------------------
    # Scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log p(continuation), continuation is greedy) per (key, context, continuation)
        token request, longest rows first in batches of batch_size."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            if len(context) + len(continuation) > self.max_length + 1:
                log.warning("Context (%d tokens) and continuation (%d) exceed the model's "
                            "maximum length (%d); dropping %d tokens on the left.", len(context),
                            len(continuation), self.max_length,
                            len(context) + len(continuation) - self.max_length - 1)
            rows.append((whole, len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            results = self._score_rows([rows[i] for i in chunk])
            for i, r in zip(chunk, results):
                out[i] = r
        return out

    def _score_rows(self, rows) -> list[tuple[float, bool]]:
        t = min(decode.bucket(max(len(w) - 1 for w, _ in rows)), self.max_length)
        tokens = np.zeros((self.batch_size, t), np.int32)
        targets, segments = np.zeros_like(tokens), np.zeros_like(tokens)
        for b, (whole, _) in enumerate(rows):
            n = len(whole) - 1
            tokens[b, :n], targets[b, :n], segments[b, :n] = whole[:-1], whole[1:], 1
        logp, greedy = jax.device_get(score(self.weights, tokens, targets, segments))
        results = []
        for b, (whole, n_cont) in enumerate(rows):
            span = slice(len(whole) - 1 - n_cont, len(whole) - 1)
            results.append((float(logp[b, span].astype(np.float64).sum()),
                            bool(greedy[b, span].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in lm_eval's disjoint windows (as its hf backend)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, predicted in map(lm_utils.make_disjoint_window,
                                          lm_utils.get_rolling_token_windows(
                                              token_list=self.tok_encode(text),
                                              prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop string, EOS or max_gen_toks tokens;
        requests with the same generation settings run together, batch_size at a time."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out = [None] * len(requests)
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], gen_kwargs)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, 256)
        eos_text = self.tok_decode([self.eot_token_id]) or None
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new = kwargs.pop("max_gen_toks")
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in the "
                             f"model's {self.max_length} tokens; lower it.")
        prompts = []
        for text in contexts:
            ids = self.tok_encode(text)
            if len(ids) > room:
                log.warning("A prompt of %d tokens plus %d to generate exceeds the model's "
                            "maximum length (%d); keeping its last %d tokens.", len(ids),
                            max_new, self.max_length, room)
                ids = ids[-room:]
            prompts.append(ids)
        stops = self._stop_ids(until)
        filler = [[self.prefix_token_id]] * (self.batch_size - len(prompts))  # fixed B
        out = decode.generate(self.weights, prompts + filler, max_new, _sampling(kwargs),
                              seed=0, stop_ids=stops, max_len=self.max_length)
        texts = []
        for b in range(len(prompts)):
            ids = out.ids(b)
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            texts.append(postprocess_generated_text(self.tok_decode(ids), until, None))
        return texts

    def _stop_ids(self, until: list[str]) -> list[int]:
        """The tokenizer's stop ids, then stop strings that are exactly one token."""
        stops = list(self.tokenizer.stop_ids)
        for s in until:
            ids = self.tokenizer.encode(s, bos=False, eos=False) if s else []
            if len(ids) == 1 and ids[0] not in stops and len(stops) < decode.MAX_STOP_IDS:
                stops.append(ids[0])
        return stops


def _sampling(kwargs: dict) -> SamplingParams:
    """lm_eval's normalized generation settings as SamplingParams (greedy unless do_sample)."""
    if not kwargs.get("do_sample"):
        return SamplingParams()
    return SamplingParams(temperature=float(kwargs.get("temperature", 1.0)),
                          top_k=int(kwargs.get("top_k") or 0),
                          top_p=float(kwargs.get("top_p") or 1.0))
