#!/usr/bin/env bash
# Several streams at once through one pipeline ring (issue #4 item 5: each stage batches
# the sessions that meet there), measured with real processes on this machine.
#
# Starts one single-process server and one ring of STAGES processes on 127.0.0.1 (a head
# `shoal serve --peer … --split …` with the layers split evenly, over STAGES-1
# `--stage-only` nodes), and a second ring started with SHOAL_BATCH_ROWS=1 (every pass runs
# one session: the ring as it was before batching, for comparison). Then, in rounds
# (--runs, medians reported), sends N greedy chat completions of max_tokens T (distinct
# prompts that ask for long answers):
#   - one after another to the single process, and to each ring;
#   - all N at once to each ring (the single process queues them: that is "one after
#     another" again).
# Aggregate tok/s = completion tokens of all N / wall time from the first request sent to
# the last answer received (prefill included: the prompts are ~40 tokens, the answers T).
# After the runs it prints each ring node's batch counts (`/metrics`).
#
# Usage: scripts/bench-concurrent.sh [--model PATH] [--streams N] [--tokens T]
#                                    [--stages S] [--runs R] [--no-build]
#   defaults: models/qwen2.5-coder-0.5b-instruct.gguf, N 4, T 128, S 3, R 3
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
model=$repo/models/qwen2.5-coder-0.5b-instruct.gguf
streams=4 tokens=128 stages=3 runs=3 build=1
while (($#)); do
  case $1 in
    --model) model=$2; shift ;;
    --streams) streams=$2; shift ;;
    --tokens) tokens=$2; shift ;;
    --stages) stages=$2; shift ;;
    --runs) runs=$2; shift ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -f $model ]] || { echo "no model file $model (see scripts/fetch-models.sh)" >&2; exit 1; }
if ((build)); then
  cargo build --release --quiet -p shoal
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A private copy: others may rebuild target/release/shoal meanwhile.
cp "$repo/target/release/shoal" "$work/shoal"

SHOAL=$work/shoal MODEL=$model STREAMS=$streams TOKENS=$tokens STAGES=$stages RUNS=$runs \
  WORK=$work python3 -u - <<'PYEOF'
import atexit, json, os, re, statistics, subprocess, threading, time, urllib.request

E = os.environ
SHOAL, MODEL, WORK = E["SHOAL"], E["MODEL"], E["WORK"]
N, T, S, RUNS = int(E["STREAMS"]), int(E["TOKENS"]), int(E["STAGES"]), int(E["RUNS"])
procs = []
atexit.register(lambda: [p.kill() for p in procs])

def start(name, args, env=None):
    log = open(os.path.join(WORK, name + ".log"), "w+")
    p = subprocess.Popen([SHOAL, "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0"]
                         + args, stdout=log, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, **(env or {})})
    procs.append(p)
    found = {}
    deadline = time.time() + 120
    while time.time() < deadline and not ("http" in found and ("--peer-port" not in args or "peer" in found)):
        log.seek(0)
        text = log.read()
        for k, pat in {"http": r"listening on http://(\S+)", "peer": r"peer port listening on (\S+)"}.items():
            m = re.search(pat, text)
            if m:
                found[k] = m.group(1)
        time.sleep(0.1)
    return found

def healthy(addr):
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/health") as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{addr} never got healthy")

def n_layers():
    """The model's block count, from the GGUF header."""
    import struct
    with open(MODEL, "rb") as f:
        _, _, _, n_kv = struct.unpack("<4sIQQ", f.read(24))
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        def rstr():
            (n,) = struct.unpack("<Q", f.read(8)); return f.read(n).decode("utf-8", "replace")
        def skip(t):
            if t == 8: rstr()
            elif t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                if et == 8:
                    for _ in range(n): rstr()
                else: f.seek(sizes[et] * n, 1)
            else: f.seek(sizes[t], 1)
        for _ in range(n_kv):
            key = rstr(); (t,) = struct.unpack("<I", f.read(4))
            if key.endswith(".block_count") and t == 4:
                return struct.unpack("<I", f.read(4))[0]
            skip(t)

L = n_layers()
bounds = [round(i * L / S) for i in range(S + 1)]
split = ",".join(f"{bounds[i]}-{bounds[i + 1] - 1}" for i in range(S))

def ring(name, env=None):
    nodes = [start(f"{name}-node{i}", ["--peer-port", "0", "--stage-only"], env) for i in range(S - 1)]
    args = ["--peer-port", "0", "--split", split]
    for n in nodes:
        args += ["--peer", n["peer"]]
    head = start(f"{name}-head", args, env)
    return head, nodes

single = start("single", [])
batched = ring("batched")
unbatched = ring("unbatched", {"SHOAL_BATCH_ROWS": "1"})
for addr in [single["http"], batched[0]["http"], unbatched[0]["http"]] + \
        [n["http"] for n in batched[1] + unbatched[1]]:
    healthy(addr)

TOPICS = ["a lighthouse keeper", "a brave dragon", "a robot learning to paint", "a lost city",
          "a sailor and a storm", "a fox in winter", "a clockmaker", "a mountain village"]
def body(i):
    return json.dumps({"messages": [{"role": "user", "content":
        f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": T, "temperature": 0}).encode()

def ask(addr, i):
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=body(i),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["usage"]["completion_tokens"]

def sequential(addr):
    t0 = time.time()
    toks = sum(ask(addr, i) for i in range(N))
    return toks, time.time() - t0

def concurrent(addr):
    out = [0] * N
    def run(i):
        out[i] = ask(addr, i)
    t0 = time.time()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in ts: t.start()
    for t in ts: t.join()
    return sum(out), time.time() - t0

configs = [
    ("single process, one after another", lambda: sequential(single["http"])),
    (f"{S}-stage ring, one after another", lambda: sequential(batched[0]["http"])),
    (f"{S}-stage ring, {N} at once, batching", lambda: concurrent(batched[0]["http"])),
    (f"{S}-stage ring, {N} at once, no batching (SHOAL_BATCH_ROWS=1)", lambda: concurrent(unbatched[0]["http"])),
]
ask(single["http"], 0); ask(batched[0]["http"], 0); ask(unbatched[0]["http"], 0)  # warm-up
results = {name: [] for name, _ in configs}
for r in range(RUNS):
    for name, f in configs:
        toks, secs = f()
        results[name].append((toks, secs))
        print(f"run {r + 1}: {name}: {toks} tokens in {secs:.2f} s = {toks / secs:.1f} tok/s", flush=True)

print(f"\nmodel {os.path.basename(MODEL)}, {N} streams of max_tokens {T}, split {split}, "
      f"{os.cpu_count()} CPUs, medians of {RUNS} runs:")
print(f"| configuration | tokens | seconds | aggregate tok/s |\n|---|---|---|---|")
for name, _ in configs:
    toks = statistics.median(t for t, _ in results[name])
    secs = statistics.median(s for _, s in results[name])
    rate = statistics.median(t / s for t, s in results[name])
    print(f"| {name} | {toks:.0f} | {secs:.2f} | {rate:.1f} |")

def metrics(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    get = lambda k: float(re.search(rf"^{k} (\S+)", text, re.M).group(1))
    return {k: get(f"shoal_stage_{k}") for k in
            ["batches_total", "batch_sessions_total", "batches_shared_total", "batch_sessions_max"]}
print("\nbatch counts (all runs, warm-up included):")
for name, (head, nodes) in [("batching", batched), ("no batching", unbatched)]:
    for i, addr in enumerate([head["http"]] + [n["http"] for n in nodes]):
        m = metrics(addr)
        print(f"  {name} stage {i}: {m['batches_total']:.0f} passes, {m['batch_sessions_total']:.0f} "
              f"session steps ({m['batch_sessions_total'] / max(m['batches_total'], 1):.2f} per pass), "
              f"{m['batches_shared_total']:.0f} shared, at most {m['batch_sessions_max']:.0f}")
PYEOF
