#!/usr/bin/env python3
"""Decode speed of JSON-constrained answers against plain ones, on running nodes.

    python3 scripts/bench-json-answers.py PORT:NAME [PORT:NAME ...]

Each node gets the same chat request three times as plain text (ignore_eos, 256 tokens) and
three times with a json_schema response_format (up to 256 tokens); the best decode speed
(tokens after the first over the time between the first and the last streamed piece) of
each is printed. Start the nodes first (docs/BENCHMARKS.md shows how).
"""
import json, sys, time, urllib.request
def stream(port, extra, max_tokens=256):
    body = {"messages": [{"role": "user", "content": "List forty animals as JSON: {\"animals\": [...]}"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    body.update(extra)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.time(); first = None; last = None; n = 0; usage = None
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]": continue
            ev = json.loads(line[6:])
            if ev.get("usage"): usage = ev["usage"]
            for c in ev.get("choices", []):
                if c["delta"].get("content"):
                    now = time.time(); first = first or now; last = now
    toks = usage["completion_tokens"]
    return toks, (toks - 1) / (last - first) if last and last > first else 0
schema = {"type": "object", "properties": {"animals": {"type": "array", "items": {"type": "string"}}}, "required": ["animals"]}
cases = {"plain (ignore_eos)": {"ignore_eos": True},
         "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}}
for port, name in [(int(a.split(":")[0]), a.split(":")[1]) for a in sys.argv[1:]]:
    for case, extra in cases.items():
        runs = [stream(port, extra) for _ in range(3)]
        best = max(r[1] for r in runs)
        print(f"{name:8} {case:20} tokens {runs[0][0]:4}  decode {best:6.1f} tok/s (best of 3)")
