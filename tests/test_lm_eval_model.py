"""The lm_eval backend `llama_jax` (tools/lm_eval.py) against lm_eval's own `hf` backend on the
Hugging Face export of the same checkpoint: per-sample log-likelihoods and metrics of local
multiple-choice, rolling-perplexity and generation tasks (YAML over local JSONL files).

The checkpoint is tiny (1 layer, D=32) with the real Llama 3 tokenizer (128,256 ids), its
output head scaled up so that log-likelihoods differ by whole nats between tokens (a shifted
target or a dropped token would move them far past the 1e-4 tolerance).
"""

import glob
import json
import logging
import os

import numpy as np
import pytest

from llama_jax import checkpoint, config as config_lib, decode, model as model_lib

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
LONG = "A longer document that goes on and on " * 12 + "über 東京 🦙"  # > max_seq_len tokens
MC = [("The capital of France is", [" Paris", " Rome", " a llama"], 0),
      ("2 + 2 =", [" 4", " 5"], 0), ("", [" blue", " green"], 1),  # empty context: BOS alone
      (LONG + " so:", [" yes", " no"], 1)]  # truncated from the left
PPL = ["Short text.", LONG, "def f(x):\n    return x\n", "  spaced \t\n\n out  "]
YAML = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: ["\\n\\n", "."], max_gen_toks: 8, do_sample: false}
metric_list: [{metric: exact_match}]""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(llama_jax export, its HF conversion, task folder)."""
    from llama_models.llama3 import tokenizer as meta_tok
    from tools import convert_checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    c = config_lib.get_config("tiny-llama3", vocab_size=128256, bos_id=128000, eos_id=128001,
                              dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                              max_seq_len=64, dtype="float32", param_dtype="float32")
    m = model_lib.create(c, seed=0)
    m.lm_head.value = m.lm_head.value * 10.0
    tok = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
    checkpoint.save_params(str(root / "orbax"), m, tokenizer_path=tok)
    convert_checkpoint.convert(str(root / "orbax"), str(root / "hf"), to="hf")
    # --to=hf wrote the tokenizer files the hf backend reads (hf_tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(root / "hf"))
    (root / "data").mkdir()
    (root / "tasks").mkdir()
    with open(root / "data" / "mc.jsonl", "w") as f:
        for q, choices, answer in MC:
            f.write(json.dumps(dict(question=q, choices=choices, answer=answer)) + "\n")
    with open(root / "data" / "ppl.jsonl", "w") as f:
        for text in PPL:
            f.write(json.dumps(dict(text=text)) + "\n")
    for task, body in YAML.items():
        data = root / "data" / ("ppl.jsonl" if task == "tiny_ppl" else "mc.jsonl")
        (root / "tasks" / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}\n")
    return str(root / "orbax"), str(root / "hf"), str(root / "tasks")


def _env(tmp):
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                HF_DATASETS_CACHE=str(tmp / "datasets"), JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def ours(setup, tmp_path_factory, monkeypatch_module):
    """tools/lm_eval.py --model llama_jax (in this process): (results JSON, {task: samples})
    from its --output_path."""
    from tools import lm_eval as tool
    orbax, _, tasks = setup
    out = tmp_path_factory.mktemp("ours")
    tool.main(["--model", "llama_jax", "--model_args", f"checkpoint={orbax},batch_size=4",
               "--tasks", ",".join(TASKS), "--include_path", tasks, "--output_path", str(out),
               "--log_samples"])
    [results] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in TASKS:
        [path] = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = [json.loads(line) for line in open(path)]
    return json.load(open(results)), samples


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory, monkeypatch_module):
    """lm_eval's hf backend on the HF export, in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    _, hf_dir, tasks = setup
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32,batch_size=4,device=cpu",
        tasks=TASKS, task_manager=TaskManager(include_path=tasks), log_samples=True,
        verbosity="ERROR")


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """Local datasets only, cached in a temporary folder; lm_eval's index of its ~13k built-in
    task files (seconds; not what is tested) left out."""
    import functools
    from lm_eval.tasks import TaskManager
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(tmp_path_factory.mktemp("env")).items():
            mp.setenv(k, v)
        mp.setattr(TaskManager, "__init__",
                   functools.partialmethod(TaskManager.__init__, include_defaults=False))
        yield mp


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_same_samples_and_metrics_as_hf_backend(ours, reference, task):
    results, samples = ours
    ref = sorted(reference["samples"][task], key=lambda s: s["doc_id"])
    mine = sorted(samples[task], key=lambda s: s["doc_id"])
    assert len(mine) == len(ref) == (len(PPL) if task == "tiny_ppl" else len(MC))
    for a, b in zip(mine, ref):
        if task == "tiny_gen":
            assert a["filtered_resps"] == b["filtered_resps"]
            continue
        for x, y in zip(a["resps"], b["resps"], strict=True):
            # 1e-4, and f32's rounding of the reference's sum over a long text (hf sums the
            # per-token log-probs in float32: |ll| 2e3 is good to ~3e-4 there)
            assert np.allclose(_logliks(x), _logliks(y), rtol=1e-6, atol=1e-4), (x, y)
    if task != "tiny_gen":  # log-likelihoods far apart: the check can tell tokens apart
        assert np.ptp([v for s in mine for v in _logliks(s["resps"])]) > 1.0
    for metric, value in reference["results"][task].items():
        if isinstance(value, float) and "stderr" not in metric:
            assert results["results"][task][metric] == pytest.approx(value, rel=1e-4), metric


def _logliks(resps) -> list[float]:
    """The log-likelihoods in a sample's resps, nested lists of ll or (ll, is_greedy); the
    samples file holds them as strings."""
    if isinstance(resps, (list, tuple)):
        return [v for r in resps for v in _logliks(r)]
    return [] if isinstance(resps, bool) or resps in ("True", "False") else [float(resps)]


def test_unknown_task_lists_where_it_looked(setup, monkeypatch_module, capsys):
    from tools import lm_eval as tool
    orbax, _, tasks = setup
    with pytest.raises(SystemExit) as e:
        tool.cli.call(tool.main, ["--model", "llama_jax", "--model_args", f"checkpoint={orbax}",
                                  "--tasks", "no_such_task", "--include_path", tasks])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Tasks not found: no_such_task") and tasks in err[-1]
    assert os.path.join("lm_eval", "tasks") in err[-1]


def test_generation_past_the_context_truncates_left_with_a_warning(setup, caplog):
    from lm_eval.api.instance import Instance
    from llama_jax import lm_eval_model
    lm = lm_eval_model.LlamaJaxLM(checkpoint=setup[0], batch_size=4)  # as `ours`: compiled
    kwargs = dict(until=["\n\n"], max_gen_toks=8, do_sample=False)
    req = lambda text: Instance("generate_until", {}, (text, kwargs), 0)  # noqa: E731
    ids = lm.tok_encode(LONG)
    assert len(ids) > lm.max_length
    with caplog.at_level(logging.WARNING, logger=lm_eval_model.__name__):
        [text] = lm.generate_until([req(LONG)])
        lm.loglikelihood([Instance("loglikelihood", {}, (LONG, " yes"), 0)])
    assert "keeping its last 56 tokens" in caplog.text  # 64 - 8 to generate
    assert f"dropping {len(ids) + 1 - 65} tokens on the left" in caplog.text  # keeps 64 + 1
    # The same as greedy decoding from the last 56 tokens, cut at the stop string.
    out = decode.generate(lm.weights, [ids[-56:]], 8, stop_ids=list(lm.tokenizer.stop_ids))
    expected = lm.tok_decode([t for t in out.ids(0) if t not in lm.tokenizer.stop_ids])
    assert text == expected.split("\n\n")[0]


def test_weights_split_over_devices_score_the_same(setup):
    from lm_eval.api.instance import Instance
    from llama_jax import lm_eval_model
    reqs = [Instance("loglikelihood", {}, (q, choices[0]), 0) for q, choices, _ in MC]
    one = lm_eval_model.LlamaJaxLM(checkpoint=setup[0], batch_size=4)
    split = lm_eval_model.LlamaJaxLM(checkpoint=setup[0], batch_size=4, tensor=2)
    assert not split.weights.embed.sharding.is_fully_replicated  # the vocab rows are split
    for (a, greedy_a), (b, greedy_b) in zip(one.loglikelihood(reqs), split.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_new_lengths_in_a_bucket_reuse_the_compiled_scorer(setup):
    from lm_eval.api.instance import Instance
    from llama_jax import lm_eval_model
    lm = lm_eval_model.LlamaJaxLM(checkpoint=setup[0], batch_size=3)  # shapes no test used
    lm.loglikelihood([Instance("loglikelihood", {}, ("a b", " c"), 0)])
    compiled = lm_eval_model.score._cache_size()
    for n in (3, 5, 9, 14):  # rows of 4 to 15 tokens: the 16-token bucket
        lm.loglikelihood([Instance("loglikelihood", {}, (" x" * n, " y"), 0)] * (n % 3 + 1))
    assert lm_eval_model.score._cache_size() == compiled
    lm.loglikelihood([Instance("loglikelihood", {}, (" x" * 20, " y"), 0)])  # 32-token bucket
    assert lm_eval_model.score._cache_size() == compiled + 1
