"""Serving throughput and latency against concurrency: experiments/serve.py vs llama.cpp's server.

    python tools/bench_serve.py --checkpoint=HF_DIR --gguf=HF_DIR/model-f32.gguf \\
        --llama_python=PYTHON_WITH_LLAMA_CPP_SERVER

Both servers load the same checkpoint (ours the HF directory, llama-cpp-python's server its
GGUF conversion, e.g. the one ../shared/bench/peer_decode.py writes) and run side by side;
for each concurrency C (--concurrency, default 1,8,32) C client threads send the same seeded
list of --requests_per_client × C streaming greedy completions: prompts of random length in
[--min_prompt, --max_prompt] letters (one token each under the byte-fallback SentencePiece
model peer_decode.py writes),
--max_tokens new tokens. The systems alternate at each C. Per system and C, one JSON line:
requests/s, output tokens/s, time to first token and inter-token latency percentiles (ms).
Output tokens are counted from the streamed logprobs (requested for that reason).
"""

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # one token each under a byte-fallback tokenizer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args):
    """Both servers, waited for; {name: (url, process)}."""
    def ours(root, log):
        port = free_port()
        return port, subprocess.Popen(
            [sys.executable, os.path.join(root, "experiments", "serve.py"),
             f"--checkpoint={args.checkpoint}", f"--port={port}", "--model_name=bench",
             f"--max_len={args.max_len}", f"--slots={args.slots}", "--max_queue=1024",
             f"--dtype={args.dtype}"], cwd=root, stderr=open(log, "w"))

    theirs = free_port()
    procs = {"llama_jax": ours(ROOT, "/tmp/bench_serve_ours.log")}
    if args.baseline_root:  # another checkout of this repository: ours before a change
        procs["llama_jax@baseline"] = ours(args.baseline_root, "/tmp/bench_serve_base.log")
    if args.gguf:
        procs["llama.cpp"] = (theirs, subprocess.Popen(
            [args.llama_python, "-m", "llama_cpp.server", "--model", args.gguf, "--port",
             str(theirs), "--model_alias", "bench", "--n_ctx", str(args.max_len),
             "--n_threads", str(args.llama_threads), "--interrupt_requests", "False"],
            stderr=open("/tmp/bench_serve_llamacpp.log", "w")))
    out = {}
    for name, (port, proc) in procs.items():
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start (see /tmp/bench_serve_*.log)")
            try:
                if httpx.get(url + "/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        out[name] = (url, proc)
    return out


def one(url, prompt, max_tokens):
    """(ttft s, [inter-token gaps s], tokens) of one streamed completion."""
    # logprobs=1: a chunk per token on both servers even while the text of byte tokens is
    # held back as an incomplete UTF-8 character (a random model emits many)
    body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                stream=True, logprobs=1)
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                tokens = (choice.get("logprobs") or {}).get("tokens") or []
                times += [time.perf_counter()] * (len(tokens) or bool(choice.get("text")))
    return times[0] - t0, list(np.diff(times)), len(times)


def run(url, work, concurrency):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda w: one(url, *w), work))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)

    def pct(xs):
        return {f"p{p}": round(1000 * float(np.percentile(xs, p)), 1) for p in (50, 90, 99)}
    return dict(requests=len(work), seconds=round(wall, 2),
                requests_per_s=round(len(work) / wall, 3),
                output_tokens_per_s=round(tokens / wall, 1), output_tokens=tokens,
                ttft_ms=pct(ttft), itl_ms=pct(itl))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gguf", help="llama.cpp's model; without it llama.cpp is not run")
    ap.add_argument("--llama_python")
    ap.add_argument("--baseline_root", help="also serve from this checkout (an A/B of ours)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests_per_client", type=int, default=2)
    ap.add_argument("--min_prompt", type=int, default=16)
    ap.add_argument("--max_prompt", type=int, default=448)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--llama_threads", type=int, default=os.cpu_count(),
                    help="llama.cpp's threads (1 on a machine shared with other work: its "
                    "threads meet at a spinning barrier every op)")
    args = ap.parse_args()
    if args.gguf and not args.llama_python:
        ap.error("--gguf needs --llama_python (a Python with llama_cpp.server).")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop both servers
    servers = launch(args)
    try:
        rng = random.Random(0)
        for i, c in enumerate(int(x) for x in args.concurrency.split(",")):
            n = max(4, args.requests_per_client * c)
            work = [("".join(rng.choice(LETTERS) for _ in range(
                rng.randint(args.min_prompt, args.max_prompt))), args.max_tokens)
                for _ in range(n)]
            names = list(servers) if i % 2 == 0 else list(reversed(servers))  # alternate
            for name in names:
                run(servers[name][0], work[:1], 1)  # warm: the first request's buckets
                print(json.dumps(dict(system=name, concurrency=c,
                                      **run(servers[name][0], work, c))), flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
