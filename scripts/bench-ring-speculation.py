#!/usr/bin/env python3
"""Speculative decoding across a ring (issue #17 item 4), measured with real processes.

Starts identical 2-stage rings of the model, each a `shoal serve --stage-only` node behind
a `shoal relay --delay-ms D` (so every head→stage and stage→stage hop is delayed D ms) and a
head (`shoal serve --peer RELAY --split …`, layers split evenly): one plain, one with
`--lookup` (the head guesses by prompt lookup, the ring verifies the guesses in one pass),
and with --model-draft PATH also one whose head guesses with that draft model and one with
both (lookup first). Then, in rounds (--runs; each request on every ring in turn), it sends
greedy, streamed chat completions through each head's API:

  edit       a Python module of ~600 tokens and "rename one function, answer with the whole
             file" (the edit workload of `shoal bench --workload edit`), max_tokens 400;
  humaneval  the first --prompts HumanEval prompts ("complete this function"), 300 tokens.

Decode tok/s = (completion tokens - 1) / (last chunk - first token); per workload the
median over its requests and rounds, and the ratio to the plain ring. The answers of all
rings must be identical, request by request (greedy): the script fails otherwise. The
speculation counters come from each head's /metrics (shoal_draft_tokens_total,
shoal_draft_accepted_tokens_total).

Usage: scripts/bench-ring-speculation.py [--model PATH] [--model-draft PATH] [--delay-ms D]
                                         [--runs N] [--prompts N] [--layers N] [--no-build]
"""

import argparse
import atexit
import gzip
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(REPO, "target", "release", "shoal")

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(REPO, "models", "qwen2.5-coder-1.5b-instruct.gguf"))
ap.add_argument("--delay-ms", type=float, default=5.0)
ap.add_argument("--runs", type=int, default=1)
ap.add_argument("--prompts", type=int, default=5)
ap.add_argument("--model-draft", default="")
ap.add_argument("--layers", type=int, default=0)
ap.add_argument("--no-build", action="store_true")
args = ap.parse_args()

if not args.no_build:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "shoal"], cwd=REPO, check=True)
WORK = tempfile.mkdtemp(prefix="bench-ring-spec-")
procs = []


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


atexit.register(stop_all)


def start(name, argv, want):
    """Starts `shoal ARGV`; returns the addresses its log announces (`want` of http, peer,
    relay)."""
    log = open(os.path.join(WORK, f"{name}.log"), "w")
    p = subprocess.Popen([SHOAL] + argv, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.PIPE, text=True)
    procs.append(p)
    found, ready = {}, threading.Event()
    pats = {"http": r"^listening on http://(\S+)", "peer": r"^peer port listening on (\S+)",
            "relay": r"^relay listening on (\S+)"}

    def reader():
        for line in p.stderr:
            log.write(line)
            log.flush()
            for k, pat in pats.items():
                m = re.match(pat, line.strip())
                if m:
                    found[k] = m.group(1)
            if all(k in found for k in want):
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(300) or not all(k in found for k in want):
        sys.exit(f"{name} did not start; see {log.name}")
    return found


def request(addr, method, path, body=None):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=600)
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def get(addr, path):
    s = request(addr, "GET", path)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def wait_healthy(addr, name):
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if get(addr, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    sys.exit(f"{name} never became healthy")


def metric(addr, name):
    _, text = get(addr, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def n_layers(model):
    """The model's layer count: --layers, else known from its file name."""
    if args.layers:
        return args.layers
    known = {"qwen2.5-coder-1.5b": 28, "qwen2.5-coder-0.5b": 24, "smollm2-135m": 30}
    for prefix, n in known.items():
        if os.path.basename(model).startswith(prefix):
            return n
    sys.exit("give the model's layer count with --layers")


def ring(tag, model, split, delay, guessing):
    stage = start(f"{tag}-stage", ["serve", "--model", model, "--host", "127.0.0.1", "--port",
                                   "0", "--peer-port", "0", "--stage-only"], ["http", "peer"])
    relay = start(f"{tag}-relay", ["relay", "--listen", "127.0.0.1:0", "--to", stage["peer"],
                                   "--delay-ms", f"{delay:g}"], ["relay"])
    argv = ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--split", split,
            "--peer", relay["relay"]] + guessing
    head = start(f"{tag}-head", argv, ["http"])
    wait_healthy(head["http"], tag)
    return head["http"]


def stream_chat(addr, prompt, max_tokens):
    s = request(addr, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    })
    f = s.makefile("rb")
    first = last = None
    text, usage = "", None
    for raw in f:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices", []):
            piece = c.get("delta", {}).get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text += piece
    s.close()
    n = usage["completion_tokens"] if usage else 0
    rate = (n - 1) / (last - first) if first and last and last > first else 0.0
    return text, n, rate


def edit_prompt():
    module = "".join(
        f"def step_{i}(values, limit={i}):\n    \"\"\"Keep the values up to {i} and sum them.\"\"\"\n"
        f"    kept = [v for v in values if v <= limit]\n    return sum(kept)\n\n"
        for i in range(16))
    return (f"Here is my module:\n\n```python\n{module}```\n\nRename `step_1` to `scale_1` "
            "(and its uses) and answer with the whole updated file, nothing else.")


def humaneval_prompts(n):
    path = os.path.join(REPO, "models", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f][:n]
    return [f"Complete this Python function:\n\n```python\n{p['prompt']}```" for p in problems]


layers = n_layers(args.model)
half = layers // 2
split = f"0-{half - 1},{half}-{layers - 1}"
print(f"model {os.path.basename(args.model)}, {layers} layers, split {split}, "
      f"{args.delay_ms:g} ms per hop; logs in {WORK}", flush=True)
kinds = {"plain": [], "lookup": ["--lookup"]}
if args.model_draft:
    kinds["draft"] = ["--model-draft", args.model_draft]
    kinds["both"] = ["--lookup", "--model-draft", args.model_draft]
heads = {name: ring(name, args.model, split, args.delay_ms, flags) for name, flags in kinds.items()}

workloads = {"edit": ([edit_prompt()], 400), "humaneval": (humaneval_prompts(args.prompts), 300)}
rates = {(w, k): [] for w in workloads for k in kinds}
for run in range(args.runs):
    for w, (prompts, max_tokens) in workloads.items():
        for i, prompt in enumerate(prompts):
            answers = {}
            for name, addr in heads.items():
                text, n, rate = stream_chat(addr, prompt, max_tokens)
                answers[name] = text
                rates[(w, name)].append(rate)
                print(f"run {run + 1} {w} #{i}: {name} {n} tokens, {rate:.1f} tok/s", flush=True)
            for name, text in answers.items():
                if text != answers["plain"]:
                    sys.exit(f"{w} #{i}: the answers differ:\n--- plain\n{answers['plain']}\n"
                             f"--- {name}\n{text}")

print()
print("| workload | " + " | ".join(f"{k} tok/s" for k in kinds) + " |")
print("|---|" + "---|" * len(kinds))
for w in workloads:
    plain = statistics.median(rates[(w, "plain")])
    cells = [f"{plain:.1f}"]
    for k in list(kinds)[1:]:
        r = statistics.median(rates[(w, k)])
        cells.append(f"{r:.1f} ({r / plain:.2f}×)")
    print(f"| {w} ({len(rates[(w, 'plain')])} requests) | " + " | ".join(cells) + " |")
print()
for k in list(kinds)[1:]:
    drafted = metric(heads[k], "shoal_draft_tokens_total")
    kept = metric(heads[k], "shoal_draft_accepted_tokens_total")
    print(f"{k}: {kept:.0f} of {drafted:.0f} guessed tokens kept")
print("answers identical in every request")
