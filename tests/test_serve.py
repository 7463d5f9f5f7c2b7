"""The server (experiments/serve.py's app over llama_jax.serve.Engine) through the openai client.

One server per module on 127.0.0.1: a tiny random model (weights x3, so logits spread and the
argmax is stable) with the Llama 3 tokenizer from the installed llama_models package. Greedy
outputs are checked against llama_jax.decode.generate on the same weights, the reference the
engine must equal.
"""

import concurrent.futures
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

import llama_jax as lj
from llama_jax import checkpoint, decode, model as model_lib, tokenizer as tokenizer_lib
from llama_jax.serve import Engine, Settings, api, steps

NAME = "tiny-serve"
SLOTS, QUEUE, MAX_LEN = 8, 8, 256


def tiny_model(vocab: int, seed: int = 0):
    config = lj.get_config("tiny", vocab_size=vocab, max_seq_len=MAX_LEN)
    model = model_lib.create(config, seed=seed)
    nnx.update(model, jax.tree.map(lambda a: a * 3.0 if a.ndim >= 2 else a, nnx.state(model)))
    return model


def llama3_tokenizer():
    from llama_models.llama3 import tokenizer as meta_tok
    return tokenizer_lib.load_tokenizer(
        os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    tok = llama3_tokenizer()
    weights = decode.prepare(tiny_model(tok.vocab_size))
    engine = Engine(weights, tok, slots=SLOTS, page_size=16, max_len=MAX_LEN, chunk=32,
                    max_queue=QUEUE)
    engine.warmup()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.create_app(engine, tok, NAME), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield dict(engine=engine, tok=tok, weights=weights, client=client, url=url)
    server.should_exit = True
    thread.join()


def reference(served, prompts, max_tokens):
    """decode.generate's greedy text for each prompt (ids), cut at its own max_tokens and at
    the first stop id, as the API reports it."""
    tok = served["tok"]
    out = decode.generate(served["weights"], prompts, max(max_tokens), stop_ids=tok.stop_ids)
    texts = []
    for i, n in enumerate(max_tokens):
        ids = out.ids(i)[:n]
        stops = [j for j, t in enumerate(ids) if t in tok.stop_ids]
        texts.append(tok.decode(ids[:stops[0]] if stops else ids))
    return texts


def complete(client, prompt, n_tokens, **kw):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=n_tokens,
                                     temperature=kw.pop("temperature", 0.0), **kw)


def test_concurrent_greedy_equals_alone_and_decode_loop(served):
    tok, client = served["tok"], served["client"]
    rng = np.random.default_rng(1)
    prompts = [tok.encode(" ".join(["word"] * n) + " end", bos=True, eos=False)
               for n in (1, 4, 9, 15, 30, 50, 70, 90)]
    prompts[3] = [1] + [int(t) for t in rng.integers(100, 120000, size=20)]
    max_tokens = [12, 30, 5, 21, 17, 9, 26, 14]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda a: complete(client, *a).choices[0].text,
                                 zip(prompts, max_tokens)))
    alone = [complete(client, p, n).choices[0].text for p, n in zip(prompts, max_tokens)]
    assert together == alone
    assert together == reference(served, prompts, max_tokens)
    assert len(set(together)) == 8  # eight different continuations, not one repeated


def test_one_running_request_decodes_one_row(served):
    engine, client = served["engine"], served["client"]
    before = engine.rows_computed
    out = complete(client, [1, 7, 8, 9], 10, extra_body=dict(stop_token_ids=[]))
    assert out.usage.completion_tokens == 10
    # the first token comes from the prefill; 9 decode steps of 1 row, not of SLOTS rows
    assert engine.rows_computed - before == 9


def test_streaming_equals_non_streaming_and_stop_strings(served):
    client = served["client"]
    kw = dict(temperature=0.9, seed=7)
    whole = complete(client, "Once upon a time", 40, **kw)
    streamed = "".join(c.choices[0].text for c in complete(
        client, "Once upon a time", 40, stream=True, **kw))
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens > 5
    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a string that occurs midway
    assert len(stop) == 3
    cut = complete(client, "Once upon a time", 40, stop=[stop], **kw)
    cut_streamed = "".join(c.choices[0].text for c in complete(
        client, "Once upon a time", 40, stop=stop, stream=True, **kw))
    assert cut.choices[0].text == text[:text.find(stop)] == cut_streamed
    assert cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_chat_format(served):
    tok, client = served["tok"], served["client"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                         temperature=0)
    ids = tok.encode_dialog(messages)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == reference(served, [ids], [10])[0]
    chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        out.choices[0].message.content


def test_n_samples_prefill_their_prompt_once(served):
    engine, client = served["engine"], served["client"]
    prompt = [1] + list(range(1000, 1040))  # 41 tokens: two full pages before the last token
    before = engine.stats()["reused_tokens"]
    out = complete(client, prompt, 6, n=4, temperature=1.0, seed=3, logprobs=2)
    assert engine.stats()["reused_tokens"] - before == 3 * 32
    texts = [c.text for c in out.choices]
    again = [c.text for c in complete(client, prompt, 6, n=4, temperature=1.0, seed=3).choices]
    assert texts == again and len(set(texts)) > 1  # seeded, and the samples differ
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(served):
    engine, order = served["engine"], []
    started, finished = threading.Event(), threading.Semaphore(0)

    def recorder(name):
        def on_event(event):
            order.append(name)
            started.set()
            if event.finish:
                finished.release()
        return on_event

    engine.submit([1, 5, 6], Settings(max_tokens=40, temperature=0, stop_ids=()), recorder("a"))
    started.wait()
    engine.submit([1] + list(range(2000, 2200)), Settings(max_tokens=1, stop_ids=()),
                  recorder("b"))  # 201 tokens: 7 chunks of 32
    finished.acquire()
    finished.acquire()
    # "a" got a token after each of b's chunks, not one long stall until b's first token
    assert order[:order.index("b")].count("a") >= 7


def _one_load_request(client, i, rng):
    """A random request: ('ok'|'cancelled'|'busy', requested tokens, tokens received)."""
    prompt = [1] + [rng.randrange(100, 120000) for _ in range(rng.randrange(1, 120))]
    n = rng.randrange(1, 40)
    cancel_after = rng.randrange(1, 6) if rng.random() < 0.25 else None
    try:
        if rng.random() < 0.1:  # a client that gives up waiting for a whole answer
            try:
                out = complete(client.with_options(timeout=0.3), prompt, n,
                               extra_body=dict(stop_token_ids=[]))
                return "ok", n, out.usage.completion_tokens
            except openai.APITimeoutError:
                return "cancelled", n, 0
        if cancel_after is None:
            out = complete(client, prompt, n, extra_body=dict(stop_token_ids=[]))
            return "ok", n, out.usage.completion_tokens
        stream = complete(client, prompt, n, stream=True, extra_body=dict(stop_token_ids=[]))
        for k, _ in enumerate(stream):
            if k + 1 == cancel_after:
                stream.close()  # the client goes away mid-generation
                return "cancelled", n, k + 1
        return "ok", n, n
    except openai.RateLimitError as e:
        assert e.response.headers["retry-after"] == "1"
        time.sleep(0.4)  # this client backs off (without retrying), so the others get in
        return "busy", n, 0


def test_200_requests_with_cancellations_and_overflow(served):
    engine, client = served["engine"], served["client"]
    idle, compiled = engine.stats(), steps.decode_step._cache_size()
    prefills = steps.prefill_step._cache_size()
    # warmup compiled every row count x page-table width
    assert compiled == len(engine.row_buckets) * len(engine.widths)
    rng = random.Random(0)
    seeds = [rng.random() for _ in range(200)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: _one_load_request(client, i, random.Random(seeds[i])),
                                range(200)))
    kinds = [r[0] for r in results]
    print({k: kinds.count(k) for k in set(kinds)})
    assert kinds.count("busy") > 0 and kinds.count("cancelled") > 0 and kinds.count("ok") > 60
    # no stop ids: every completed request ran to its max_tokens
    assert all(got == n for kind, n, got in results if kind == "ok")
    deadline = time.time() + 10
    while engine.stats() != idle and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats() == idle  # every page and slot back, nothing waiting
    assert steps.decode_step._cache_size() == compiled  # no request mix recompiled it
    assert steps.prefill_step._cache_size() == prefills  # nor any prompt length or offset


BAD = [
    (dict(model="llama-other", prompt="hi"), "model"),
    (dict(prompt="hi"), "model"),
    (dict(model=NAME, prompt="hi", max_tokens=0), "max_tokens"),
    (dict(model=NAME, prompt="hi", max_tokens=MAX_LEN), "max_tokens"),
    (dict(model=NAME, prompt="hi", temperature=-0.5), "temperature"),
    (dict(model=NAME, prompt="hi", top_p=0), "top_p"),
    (dict(model=NAME, prompt="hi", top_p=1.5), "top_p"),
    (dict(model=NAME, prompt=[1] * MAX_LEN), "prompt"),
    (dict(model=NAME, prompt=[1, 10**9]), "prompt"),
    (dict(model=NAME, prompt="hi", n=0), "n"),
    (dict(model=NAME, prompt="hi", stop=[1]), "stop"),
]


def test_bad_input_is_400_naming_the_field(served):
    url = served["url"] + "/v1/completions"
    for body, field in BAD:
        r = httpx.post(url, json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field, (body, r.text)
        assert field in err["message"] and err["message"].count(". ") == 0, err["message"]
    r = httpx.post(url, content=b'{"model": "x", "prompt": ', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(served["url"] + "/v1/chat/completions",
                   json=dict(model=NAME, messages=[{"role": "robot", "content": "x"}]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # ... and everyone else is still served
    assert complete(served["client"], "hi", 3).usage.completion_tokens == 3
    models = served["client"].models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(served["url"] + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_launcher_serves_and_drains_on_sigterm(tmp_path):
    """experiments/serve.py on a saved checkpoint: serves, and on SIGTERM lets a running
    stream finish, then exits; a plain mistake is one error line and exit code 2."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "experiments", "serve.py")
    ckpt = checkpoint.save_params(str(tmp_path / "ckpt"), tiny_model(259),
                                  tokenizer_path=tokenizer_lib.BYTE)
    bad = subprocess.run([sys.executable, script, f"--checkpoint={tmp_path}/missing"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    port = free_port()
    proc = subprocess.Popen([sys.executable, script, f"--checkpoint={ckpt}", f"--port={port}",
                             "--chunk=16", "--slots=2", "--max_len=128",  # few shapes
                             "--shutdown_timeout=60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="ckpt", prompt="abc", max_tokens=120,
                                           temperature=0, stream=True,
                                           extra_body=dict(stop_token_ids=[]))
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the running request still completes
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
