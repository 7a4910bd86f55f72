#!/usr/bin/env python3
"""Records every answer the swarm's `verify` strategy considers on HumanEval, and judges them.

`shoal eval` scores the one answer the swarm gives. This asks the head's `/v1/swarm/query`
instead, which returns every candidate, written test and repair, and then replays each pool
(`crates/swarm/examples/verify_replay.rs`, in the sandbox) against the hidden tests. It
tells the two ways `verify` fails apart: no candidate in the pool was right (generation), or
one was and another was chosen (selection).

    scripts/verify-pools.py --out pools/            # starts the swarm itself, all 164
    scripts/verify-pools.py --out pools/ --offset 40 --limit 20
    scripts/verify-pools.py --out pools/ --url http://127.0.0.1:18080   # a running head
    scripts/verify-pools.py --out pools/ --report   # judge what is recorded, ask nothing

The swarm it starts is `shoal eval --agents qwen05:reasoner,qwen05:factchecker,qwen05:critic`'s:
one agent process serving the three roles and a head on the same model, on loopback.
Requests are the eval's (its system prompt and user message), greedy, `--seed 1`, 512
tokens, with 1800 s timeouts. Recording resumes where `pools.jsonl` ends.
"""

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(ROOT, "target", "release", "shoal")
REPLAY = os.path.join(ROOT, "target", "release", "examples", "verify_replay")
# The eval's request (crates/eval/src/humaneval.rs: SYSTEM_PROMPT, user_message).
SYSTEM_PROMPT = (
    "You are an expert Python programmer. Complete the Python function the user gives you. "
    "Reply with the complete implementation (the imports and the whole function definition) "
    "in a single ```python code block, and nothing else."
)


def user_message(prompt):
    return "Complete this Python function:\n```python\n" + prompt.rstrip() + "\n```"


def problems(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def serve(args):
    """`shoal serve ARGS` on loopback: the process and the addresses it prints."""
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_API_KEY"}
    proc = subprocess.Popen(
        [SHOAL, "serve"] + args + ["--host", "127.0.0.1", "--port", "0"], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    http = peer = None
    wants_peer = "--peer-port" in args
    for line in proc.stderr:
        line = line.strip()
        if line.startswith("listening on http://"):
            http = line[len("listening on http://"):]
        elif line.startswith("peer port listening on "):
            peer = line[len("peer port listening on "):]
        if http and (peer or not wants_peer):
            break
    if not http:
        proc.kill()
        sys.exit("shoal serve did not print its addresses")
    # Drain stderr for the life of the process, so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, "http://" + http, peer


def wait_for(url, what):
    """Waits (up to 300 s) until GET `url` answers 200."""
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"{what} did not come up ({url})")


def start_swarm(model, timeout_s):
    """An agent serving three roles and a head, as `shoal eval --agents` starts them."""
    if not os.path.exists(SHOAL):
        sys.exit(f"{SHOAL} is missing: cargo build --release -p shoal")
    agent, agent_url, peer = serve(["--model", model, "--peer-port", "0",
                                    "--role", "reasoner,factchecker,critic"])
    # The head counts only agents that answer its first Describe: wait for the model.
    wait_for(agent_url + "/health", "the agent")
    head, url, _ = serve(["--model", model, "--peer", peer,
                          "--swarm-timeout-simple", str(timeout_s),
                          "--swarm-timeout-complex", str(timeout_s)])
    wait_for(url + "/v1/swarm/status", "the head's swarm")
    return [agent, head], url


def ask(url, problem, seed, timeout_s):
    body = {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": user_message(problem["prompt"])}],
        "strategy": "verify", "max_tokens": 512, "temperature": 0, "seed": seed,
        "timeout_s": timeout_s,
    }
    req = urllib.request.Request(url + "/v1/swarm/query", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    started = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s + 60) as r:
            reply = json.load(r)
    except Exception as e:  # the request failed: recorded, and it counts as failed
        reply = {"error": str(e)}
    reply["task_id"] = problem["task_id"]
    reply["request_s"] = time.time() - started
    return reply


def record(args, chosen):
    path = os.path.join(args.out, "pools.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            # A request that failed is asked again.
            done = {r["task_id"] for r in map(json.loads, filter(str.strip, f))
                    if "error" not in r}
    todo = [p for p in chosen if p["task_id"] not in done]
    if not todo:
        return
    procs, url = ([], args.url) if args.url else start_swarm(args.model, args.timeout_s)
    try:
        with open(path, "a") as out:
            for i, problem in enumerate(todo):
                reply = ask(url, problem, args.seed, args.timeout_s)
                out.write(json.dumps(reply) + "\n")
                out.flush()
                print(f"{problem['task_id']}: {reply['request_s']:.1f} s "
                      f"({i + 1}/{len(todo)})", file=sys.stderr)
    finally:
        for p in procs:
            p.kill()


def replay(args, by_id):
    """Judges each recorded pool (verify_replay, in the sandbox); returns its lines."""
    with open(os.path.join(args.out, "pools.jsonl")) as f:
        # The last record of each problem (a failed request is recorded, then asked again).
        pools = list({r["task_id"]: r for r in map(json.loads, filter(str.strip, f))}.values())
    lines = []
    for pool in pools:
        problem = by_id.get(pool["task_id"])
        if problem is None or "answers" not in pool:
            continue
        lines.append(json.dumps({
            "id": pool["task_id"], "question": user_message(problem["prompt"]),
            "answers": pool["answers"], "final_answer": pool.get("final_answer", ""),
            "judge": problem["test"] + f"\ncheck({problem['entry_point']})",
        }))
    if not lines:
        sys.exit("no recorded pool has answers")
    if not os.path.exists(REPLAY):
        sys.exit(f"{REPLAY} is missing: cargo build --release -p shoal-swarm --example verify_replay")
    run = subprocess.run([REPLAY], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True)
    replayed = {}
    for line in run.stdout.splitlines():
        r = json.loads(line)
        if "candidates" in r:  # not a problem the head reads as a task: left out
            replayed[r["id"]] = r
    with open(os.path.join(args.out, "replayed.jsonl"), "w") as f:
        f.write(run.stdout)
    return pools, replayed


def report(pools, replayed):
    n = passed = oracle = replayed_right = 0
    lost, seconds = [], []
    by_task = Counter()
    right_by_task = Counter()
    for pool in pools:
        r = replayed.get(pool["task_id"])
        n += 1
        seconds.append(pool.get("request_s", 0.0))
        if r is None:
            continue
        judged = [c["passes_judge"] for c in r["candidates"]]
        passed += bool(r["final_passes_judge"])
        choice = r.get("replayed_choice")
        replayed_right += choice is not None and bool(judged[choice])
        oracle += any(judged)
        if any(judged) and not r["final_passes_judge"]:
            lost.append(pool["task_id"].split("/")[-1])
        for c in r["candidates"]:
            by_task[c["task"]] += 1
            right_by_task[c["task"]] += bool(c["passes_judge"])
    print(f"problems: {n}")
    print(f"final answers passing the hidden tests: {passed}")
    print(f"the choice of this build over each whole pool passing them: {replayed_right}")
    print(f"pools with a passing candidate: {oracle} (lost with one in the pool: "
          f"{', '.join(lost) or 'none'})")
    if seconds:
        s = sorted(seconds)
        print(f"seconds per request: mean {sum(s) / len(s):.1f}, median {s[len(s) // 2]:.1f}, "
              f"max {s[-1]:.1f}")
    for task, count in by_task.most_common():
        print(f"  {task:9} answers: {count:4}, passing {right_by_task[task]:4} "
              f"({100 * right_by_task[task] / count:.0f} %)")


# Other ways to order the groups of behaviour, for comparison: each takes a group's
# (examples passed, candidates, tests passed) and returns its sort key; the first group wins
# ties, as in `choose` (where the agents' weights, all equal here, come last).
SCORES = {
    "candidates x tests (CodeT)": lambda e, m, t: (e, m * t, m),
    "candidates x tests^2 (this build)": lambda e, m, t: (e, m * t * t, t, m),
    "tests, then candidates": lambda e, m, t: (e, t, m),
    "candidates, then tests": lambda e, m, t: (e, m, t),
}


def other_scores(replayed):
    """How many problems each of SCORES chooses right over the whole recorded pools."""
    right = Counter()
    for r in replayed.values():
        examples = len(r["examples"])
        groups = {}
        for c in r["candidates"]:
            if not c["defined"]:
                continue
            g = groups.setdefault(tuple(c["outs"]), {
                "members": 0, "right": bool(c["passes_judge"]),
                "examples": sum(c["oks"][:examples]), "tests": sum(c["oks"][examples:])})
            g["members"] += 1
        for name, key in SCORES.items():
            best = None
            for g in groups.values():
                k = key(g["examples"], g["members"], g["tests"])
                if best is None or k > best[0]:
                    best = (k, g)
            right[name] += best is not None and best[1]["right"]
    print("the groups' order replayed (right answers chosen):")
    for name in SCORES:
        print(f"  {name:34} {right[name]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for pools.jsonl and replayed.jsonl")
    ap.add_argument("--data", default=os.path.join(ROOT, "models", "HumanEval.jsonl.gz"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "qwen2.5-coder-0.5b-instruct.gguf"))
    ap.add_argument("--url", help="a running head's API instead of starting the swarm")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout-s", type=int, default=1800)
    ap.add_argument("--report", action="store_true", help="judge what is recorded only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    every = problems(args.data)
    chosen = every[args.offset:][:args.limit] if args.limit else every[args.offset:]
    if not args.report:
        record(args, chosen)
    pools, replayed = replay(args, {p["task_id"]: p for p in every})
    report(pools, replayed)
    other_scores(replayed)


if __name__ == "__main__":
    main()
