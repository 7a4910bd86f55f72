#!/usr/bin/env bash
# Pipeline mode, measured with real processes on this machine (issue #4 item 7).
#
# Starts, and keeps running for the whole benchmark, one single-process server and, for
# every stage count and link delay, a pipeline: N-1 `shoal serve --stage-only` nodes, a
# `shoal relay --delay-ms D` in front of each stage node's peer port (D > 0), and a head
# (`shoal serve --peer RELAY … --split …`, layers split evenly) that answers the OpenAI API
# through the ring. Every head→stage and stage→stage hop then passes one relay and is
# delayed D ms; the last stage's reply to the head is NOT delayed (the last stage dials the
# head's reply listener itself, an address no relay sits in front of), so the table also
# gives the decode speed with that hop's D added back (+D ms per token: the reply is one
# 33-byte frame, so on a real link it costs just the propagation delay).
#
# Then, in rounds (all configurations in turn, --runs rounds; medians are reported), it
# sends through each server's API, streaming, greedy:
#   A. a ~512-token prompt, max_tokens 1: prefill tok/s = prompt tokens / time to first token;
#   B. a ~64-token prompt, max_tokens D+1: prefill tok/s as above, and decode tok/s =
#      (completion tokens - 1) / (time of the last chunk - time of the first token).
# Token counts come from the `usage` chunk (`stream_options.include_usage`).
#
# Per-stage compute = the single-process decode (or prefill) ms per token of the same run
# × the stage's share of the layers (so the stages sum to the whole model; `shoal plan`'s
# own per-layer profile is printed alongside as a cross-check). Per-hop time =
# (ring ms/token − single-process ms/token) / hops, hops = stages (the ring closes at the
# head). Bytes per token = one decode `Forward` frame (crates/wire/src/message/session.rs:
# 12 header + 24 ids (session, seq, plan) + 8 position + 10 activation header + hidden × dtype size + 42 greedy
# sampling spec + 7 reply address), sent on each of the N-1 stage-to-stage hops, plus
# one 33-byte `Token` frame back to the head. Peak RSS = VmHWM of every process at the end.
#
# Usage: scripts/bench-pipeline.sh [--model PATH] [--runs N] [--f16] [--keyed] [--wait-idle P]
#                                  [--no-build] [--json FILE]
#   --model PATH   GGUF file (default models/qwen2.5-coder-0.5b-instruct.gguf)
#   --runs N       rounds over all configurations; medians are reported (default 3)
#   --f16          also f16 activations (3 stages, delay 0 and 10 ms)
#   --keyed        also the largest ring with delay 0 under a swarm key (every hop
#                  encrypted, docs/SECURITY.md), next to the same ring without one
#   --wait-idle P  before each measurement wait (at most 60 s, 5 min in all) until the CPU
#                  is under P % busy (2 s sample, niced processes not counted; the servers
#                  here park when idle)
#   --no-build     use target/release/shoal as it is
#   --json FILE    raw results (default target/bench-pipeline.json)
# Env: BENCH_DECODE_TOKENS (default 128), BENCH_DELAYS (default "0 2 10"),
#      BENCH_STAGES (default "2 3"), BENCH_KEEP (keep the logs in this directory).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

model=$repo/models/qwen2.5-coder-0.5b-instruct.gguf
runs=3 f16=0 keyed=0 wait_idle= build=1 json=$repo/target/bench-pipeline.json
while (($#)); do
  case $1 in
    --model) model=$2; shift ;;
    --runs) runs=$2; shift ;;
    --f16) f16=1 ;;
    --keyed) keyed=1 ;;
    --wait-idle) wait_idle=$2; shift ;;
    --no-build) build=0 ;;
    --json) json=$2; shift ;;
    -h | --help) sed -n '2,43p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -f $model ]] || { echo "no model file $model (see scripts/fetch-models.sh)" >&2; exit 1; }

if ((build)); then
  echo "building shoal (release)…" >&2
  cargo build --release --quiet -p shoal
fi
shoal=$repo/target/release/shoal
[[ -x $shoal ]] || { echo "missing $shoal (run without --no-build)" >&2; exit 1; }

# Run a private copy: others may rebuild target/release/shoal while this runs.
work=${BENCH_KEEP:-$(mktemp -d)}
mkdir -p "$work" "$(dirname "$json")"
[[ -n ${BENCH_KEEP:-} ]] || trap 'rm -rf "$work"' EXIT
cp "$shoal" "$work/shoal"

SHOAL=$work/shoal MODEL=$model RUNS=$runs F16=$f16 KEYED=$keyed WAIT_IDLE=$wait_idle JSON_OUT=$json \
  WORK=$work DECODE_TOKENS=${BENCH_DECODE_TOKENS:-128} DELAYS=${BENCH_DELAYS:-"0 2 10"} \
  STAGES=${BENCH_STAGES:-"2 3"} TREE=$(git describe --always --dirty 2>/dev/null || echo unknown) \
  python3 -u - <<'PYEOF'
import atexit, json, os, re, signal, socket, statistics, struct, subprocess, sys, threading, time

E = os.environ
SHOAL, MODEL, WORK = E["SHOAL"], E["MODEL"], E["WORK"]
RUNS, DECODE = int(E["RUNS"]), int(E["DECODE_TOKENS"])
WAIT_IDLE = int(E["WAIT_IDLE"]) if E.get("WAIT_IDLE") else None
DELAYS = [float(d) for d in E["DELAYS"].split()]
STAGES = [int(s) for s in E["STAGES"].split()]
started_at = time.time()

def log(*a):
    print(*a, file=sys.stderr, flush=True)

# ---------------------------------------------------------------- model shape (GGUF header)
def gguf_meta(path, wanted):
    """The scalar metadata values named in `wanted`, read from a GGUF v2/v3 header."""
    out = {}
    with open(path, "rb") as f:
        magic, version, _tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF", "not a GGUF file"
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
        def rstr():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")
        def skip(t):
            if t == 8:
                rstr()
            elif t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                if et == 8:
                    for _ in range(n):
                        rstr()
                elif et == 9:
                    for _ in range(n):
                        skip(9)
                else:
                    f.seek(sizes[et] * n, 1)
            else:
                f.seek(sizes[t], 1)
        for _ in range(n_kv):
            key = rstr()
            (t,) = struct.unpack("<I", f.read(4))
            if key in wanted and t in fmt:
                out[key] = struct.unpack(fmt[t], f.read(sizes[t]))[0]
            elif key == "general.architecture" and t == 8:
                out[key] = rstr()
            else:
                skip(t)
    return out

meta = gguf_meta(MODEL, set())
arch = meta.get("general.architecture", "llama")
meta = gguf_meta(MODEL, {f"{arch}.block_count", f"{arch}.embedding_length"})
N_LAYERS = int(meta[f"{arch}.block_count"])
HIDDEN = int(meta[f"{arch}.embedding_length"])

def split_evenly(n_stages):
    bounds = [round(i * N_LAYERS / n_stages) for i in range(n_stages + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n_stages)]

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
def forward_frame_bytes(dtype):
    # header 12; session_id + seq + plan_id 24; positions u32 count + 1 × u32 = 8; payload tag 1 +
    # rows 4 + cols 4 + dtype 1; data; want tag 1 + greedy SamplingSpec (7 × 4 + seed 8 +
    # logprob 1 + empty penalty window 4 = 41); reply_to IPv4 1 + 4 + 2.
    return 12 + 24 + 8 + 10 + HIDDEN * DTYPE_BYTES[dtype] + 42 + 7
TOKEN_FRAME_BYTES = 12 + 8 + 8 + 4 + 1

# ---------------------------------------------------------------- processes
procs = []  # every process started, for the RSS table and the cleanup

def stop_all():
    """Ends every process this run started (also when it fails or is interrupted)."""
    for p in procs:
        if p.p.poll() is None:
            p.p.terminate()
    for p in procs:
        try:
            p.p.wait(10)
        except subprocess.TimeoutExpired:
            p.p.kill()

atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

class Proc:
    def __init__(self, name, args, want, env=None):
        self.name = name
        self.logf = open(os.path.join(WORK, f"{name}.log"), "w")
        self.p = subprocess.Popen([SHOAL] + args, stdin=subprocess.DEVNULL,
                                  stdout=self.logf, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        self.found = {}
        self.ready = threading.Event()
        procs.append(self)
        pats = {"http": r"^listening on http://(\S+)", "peer": r"^peer port listening on (\S+)",
                "relay": r"^relay listening on (\S+)"}
        def reader():
            for line in self.p.stderr:
                self.logf.write(line)
                self.logf.flush()
                for k, pat in pats.items():
                    m = re.match(pat, line.strip())
                    if m:
                        self.found[k] = m.group(1)
                if all(k in self.found for k in want):
                    self.ready.set()
            self.ready.set()
        threading.Thread(target=reader, daemon=True).start()
        if not self.ready.wait(120) or not all(k in self.found for k in want):
            raise SystemExit(f"{name} did not start; see {self.logf.name}")

    def rss_mib(self):
        try:
            for line in open(f"/proc/{self.p.pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

def hostport(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)

def wait_healthy(addr, name, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, _ = http_get(addr, "/health")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} never became healthy")

def http_get(addr, path):
    s = socket.create_connection(hostport(addr), timeout=10)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head = data.split(b"\r\n", 1)[0].decode()
    return int(head.split()[1]), data

# ---------------------------------------------------------------- one streamed request
def stream_chat(addr, prompt, max_tokens):
    """Sends a streaming chat completion; returns timings, usage and the text."""
    body = json.dumps({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
        # Every round computes the whole prompt: the prompt cache would otherwise serve
        # rounds 2 and on from the first round's keys and values.
        "cache_prompt": False,
    }).encode()
    s = socket.create_connection(hostport(addr), timeout=600)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    t0 = time.perf_counter()
    s.sendall(req + body)
    raw = b""          # undecoded bytes
    headers_done = False
    chunked = False
    body_buf = b""     # de-chunked body not yet split into events
    t_first = t_last = None
    usage, text, done, error = None, [], False, None

    def events(now):
        nonlocal body_buf, t_first, t_last, usage, done, error
        while b"\n\n" in body_buf:
            ev, body_buf = body_buf.split(b"\n\n", 1)
            for line in ev.decode().splitlines():
                if not line.startswith("data: "):
                    continue
                d = line[6:]
                if d == "[DONE]":
                    done = True
                    continue
                v = json.loads(d)
                if "error" in v:
                    error = v["error"]
                    continue
                if v.get("usage"):
                    usage = v["usage"]
                for c in v.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece or c.get("finish_reason"):
                        if t_first is None:
                            t_first = now
                        t_last = now
                    if piece:
                        text.append(piece)

    while True:
        chunk = s.recv(65536)
        now = time.perf_counter()
        if not chunk:
            break
        raw += chunk
        if not headers_done:
            if b"\r\n\r\n" not in raw:
                continue
            head, raw = raw.split(b"\r\n\r\n", 1)
            status = int(head.split()[1])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
            chunked = b"transfer-encoding: chunked" in head.lower()
            headers_done = True
        if chunked:
            while True:
                if b"\r\n" not in raw:
                    break
                size_line, rest = raw.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    break
                body_buf += rest[:size]
                raw = rest[size + 2:]
                if size == 0:
                    break
        else:
            body_buf += raw
            raw = b""
        events(now)
        if done:
            break
    s.close()
    if error or usage is None or t_first is None:
        raise RuntimeError(f"bad stream: error={error} usage={usage}")
    return {"ttft_s": t_first - t0, "t_last_s": t_last - t0, "total_s": time.perf_counter() - t0,
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "text": "".join(text)}

# ~64 and ~512 tokens with the chat template; the short one asks for a long answer.
SHORT = ("Write a complete Python module implementing a red-black tree: a Node class and a "
         "RedBlackTree class with insert, delete, search, in-order traversal and rotations. "
         "Add a docstring to every method and explain each step in comments.")
def long_prompt(n_functions):
    code = "\n".join(
        f"def f{i}(x, y):\n    if x > {i}:\n        return x * {i} + y\n    return y - {i}"
        for i in range(n_functions))
    return ("Read this Python code and describe what each function does, then suggest how to "
            "simplify it.\n\n```python\n" + code + "\n```")
LONG_TARGET = 512

# ---------------------------------------------------------------- load on a shared machine
def cpu_busy_pct(sample=2.0):
    """Share of all cores busy over `sample` seconds, not counting niced processes (they
    yield to these servers, which run at normal priority)."""
    def read():
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return v[0] + v[2] + v[5] + v[6] + v[7], sum(v[:8])
    b1, t1 = read()
    time.sleep(sample)
    b2, t2 = read()
    return round(100 * (b2 - b1) / (t2 - t1)) if t2 > t1 else 0

settle_budget = [300.0]  # seconds of waiting in all, so the run stays within ~15 minutes

def settle():
    if WAIT_IDLE is None:
        return None
    started = time.time()
    deadline = started + min(60.0, settle_budget[0])
    while True:
        pct = cpu_busy_pct()
        if pct < WAIT_IDLE or time.time() > deadline:
            settle_budget[0] -= time.time() - started
            return pct

# ---------------------------------------------------------------- configurations
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
log(f"model {os.path.basename(MODEL)}: {N_LAYERS} layers, hidden {HIDDEN}")

log("profiling layers with `shoal plan` …")
plan_out = subprocess.run([SHOAL, "plan", "--model", MODEL], capture_output=True, text=True)
m1 = re.search(r"compute ([\d.]+) ms\s+no hops", plan_out.stdout)
m2 = re.search(r"≈ ([\d.]+) ms of compute per prompt token", plan_out.stdout)
plan_profile = {
    "decode_ms_per_layer": float(m1.group(1)) / N_LAYERS if m1 else None,
    "prefill_ms_per_layer_token": float(m2.group(1)) / N_LAYERS if m2 else None,
    "output": plan_out.stdout,
}

configs = []  # dicts: name, stages, delay_ms, activations, split, head, stage_procs
log("starting the single-process server …")
single = Proc("single", ["serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0"], ["http"])
wait_healthy(single.found["http"], "single")
configs.append({"name": "1 stage", "stages": 1, "delay_ms": 0.0, "activations": "f32",
                "split": [(0, N_LAYERS - 1)], "head": single, "stage_procs": []})

def start_ring(n, delay, act, keyed=False):
    split = split_evenly(n)
    tag = f"s{n}-d{delay:g}-{act}" + ("-keyed" if keyed else "")
    env = {"SHOAL_SWARM_KEY": SWARM_KEY} if keyed else {}
    nodes = []
    for i in range(1, n):
        nodes.append(Proc(f"{tag}-stage{i}", ["serve", "--model", MODEL, "--host", "127.0.0.1",
                                              "--port", "0", "--peer-port", "0", "--stage-only"],
                          ["http", "peer"], env))
    peers = []
    for i, node in enumerate(nodes, 1):
        if delay > 0:
            r = Proc(f"{tag}-relay{i}", ["relay", "--listen", "127.0.0.1:0", "--to",
                                         node.found["peer"], "--delay-ms", f"{delay:g}"], ["relay"])
            peers.append(r.found["relay"])
        else:
            peers.append(node.found["peer"])
    args = ["serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0",
            "--activations", act, "--split", ",".join(f"{a}-{b}" for a, b in split)]
    for p in peers:
        args += ["--peer", p]
    head = Proc(f"{tag}-head", args, ["http"], env)
    wait_healthy(head.found["http"], tag)
    return {"name": f"{n} stages, {delay:g} ms, {act}" + (", keyed" if keyed else ""),
            "stages": n, "delay_ms": delay,
            "activations": act, "split": split, "head": head, "stage_procs": nodes}

wanted = [(n, d, "f32", False) for n in STAGES for d in DELAYS]
if E["F16"] == "1":
    wanted += [(max(STAGES), d, "f16", False) for d in (DELAYS[0], DELAYS[-1])]
if E["KEYED"] == "1":
    SWARM_KEY = subprocess.run([SHOAL, "key", "new"], capture_output=True, text=True,
                               check=True).stdout.strip()
    wanted += [(max(STAGES), 0.0, "f32", True)]
for n, d, act, keyed in wanted:
    log(f"starting {n} stages, delay {d:g} ms, {act}{', keyed' if keyed else ''} …")
    configs.append(start_ring(n, d, act, keyed))
def cpu_ticks(p):
    try:
        v = open(f"/proc/{p.p.pid}/stat").read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0

# Do idle servers and relays park? Their own CPU time over 5 s, next to the machine's load.
t_before = sum(cpu_ticks(p) for p in procs)
idle = cpu_busy_pct(5.0)
own_idle = 100 * (sum(cpu_ticks(p) for p in procs) - t_before) / os.sysconf("SC_CLK_TCK") / 5.0 / (os.cpu_count() or 1)
log(f"{len(procs)} processes up; idle, they use {own_idle:.1f}% of the CPU (machine: {idle}% busy)")

# Size the long prompt to ~512 tokens of this model's tokenizer (two short probes).
p0 = stream_chat(single.found["http"], long_prompt(0), 1)["prompt_tokens"]
p4 = stream_chat(single.found["http"], long_prompt(4), 1)["prompt_tokens"]
LONG = long_prompt(max(1, round((LONG_TARGET - p0) * 4 / max(1, p4 - p0))))

# Warm-up: the first request of a process pays page faults and allocations.
for c in configs:
    stream_chat(c["head"].found["http"], SHORT, 8)

# ---------------------------------------------------------------- the rounds
samples = []
for r in range(RUNS):
    order = configs if r % 2 == 0 else list(reversed(configs))
    for c in order:
        busy = settle()
        a = stream_chat(c["head"].found["http"], LONG, 1)
        b = stream_chat(c["head"].found["http"], SHORT, DECODE + 1)
        dec_n = b["completion_tokens"] - 1
        dec_s = b["t_last_s"] - b["ttft_s"]
        s = {"config": c["name"], "round": r, "cpu_busy_before_pct": busy,
             "prefill_long_prompt_tokens": a["prompt_tokens"],
             "prefill_long_tok_s": a["prompt_tokens"] / a["ttft_s"],
             "prefill_short_prompt_tokens": b["prompt_tokens"],
             "prefill_short_tok_s": b["prompt_tokens"] / b["ttft_s"],
             "decode_tokens": dec_n,
             "decode_tok_s": dec_n / dec_s if dec_s > 0 else None,
             "decode_ms_per_token": 1e3 * dec_s / dec_n if dec_n > 0 else None,
             "text": b["text"]}
        samples.append(s)
        log(f"  round {r + 1}/{RUNS} {c['name']:<22} prefill {s['prefill_long_tok_s']:6.1f} / "
            f"{s['prefill_short_tok_s']:6.1f} tok/s, decode {s['decode_tok_s'] or 0:5.1f} tok/s "
            f"({dec_n} tokens)" + (f", CPU {busy}% busy before" if busy is not None else ""))

# ---------------------------------------------------------------- results
def med(name, key):
    xs = [s[key] for s in samples if s["config"] == name and s[key] is not None]
    return statistics.median(xs) if xs else None

single_dec_ms = med("1 stage", "decode_ms_per_token")
single_pre_ms = 1e3 / med("1 stage", "prefill_long_tok_s")
single_rss = single.rss_mib()
ref_text = next(s["text"] for s in samples if s["config"] == "1 stage")
results = []
for c in configs:
    n, d, act = c["stages"], c["delay_ms"], c["activations"]
    dec_ms = med(c["name"], "decode_ms_per_token")
    stage_layers = [b - a + 1 for a, b in c["split"]]
    stage_dec = [single_dec_ms * k / N_LAYERS for k in stage_layers]
    stage_pre = [single_pre_ms * k / N_LAYERS for k in stage_layers]
    hops = n if n > 1 else 0
    texts = {s["text"] for s in samples if s["config"] == c["name"]}
    rss = [c["head"].rss_mib()] + [p.rss_mib() for p in c["stage_procs"]]
    res = {
        "config": c["name"], "stages": n, "delay_ms_each_way": d, "activations": act,
        "split": [f"{a}-{b}" for a, b in c["split"]],
        "prefill_long_tok_s": med(c["name"], "prefill_long_tok_s"),
        "prefill_short_tok_s": med(c["name"], "prefill_short_tok_s"),
        "decode_tok_s": med(c["name"], "decode_tok_s"),
        "decode_ms_per_token": dec_ms,
        "decode_vs_single": (single_dec_ms / dec_ms) if dec_ms else None,
        "decode_tok_s_reply_delayed_too": 1e3 / (dec_ms + d) if n > 1 else None,
        "stage_compute_decode_ms": stage_dec,
        "stage_compute_prefill_ms_per_token": stage_pre,
        "hops": hops,
        "delayed_hops": n - 1 if d > 0 else 0,
        "per_hop_ms": (dec_ms - single_dec_ms) / hops if hops else None,
        "forward_frame_bytes": forward_frame_bytes(act) if n > 1 else 0,
        "ring_bytes_per_token": (n - 1) * forward_frame_bytes(act) + TOKEN_FRAME_BYTES if n > 1 else 0,
        "peak_rss_mib": rss,
        "peak_rss_vs_single": [x / single_rss if x and single_rss else None for x in rss],
        "same_text_as_single": texts == {ref_text},
    }
    results.append(res)

doc = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_at)),
    "tree": E["TREE"], "machine": f"{cpu}, {os.cpu_count()} cores",
    "model": os.path.basename(MODEL), "layers": N_LAYERS, "hidden": HIDDEN,
    "runs": RUNS, "decode_tokens_asked": DECODE, "wait_idle_pct": WAIT_IDLE,
    "cpu_busy_machine_pct": idle, "cpu_own_idle_pct": own_idle, "load_avg_end": open("/proc/loadavg").read().split()[:3],
    "plan_profile": plan_profile, "results": results, "samples": samples,
    "minutes": round((time.time() - started_at) / 60, 1),
}
with open(E["JSON_OUT"], "w") as f:
    json.dump(doc, f, indent=1)

stop_all()

def f(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)

print(f"## Pipeline mode: {os.path.basename(MODEL)}")
print()
print(f"- date: {doc['date']}, tree {doc['tree']}, {doc['minutes']} min")
print(f"- machine: {doc['machine']}; all {len(procs)} processes idle use {own_idle:.1f}% of the CPU "
      f"(the machine was {idle}% busy then); "
      f"load average at end: {' '.join(doc['load_avg_end'])}")
print(f"- {RUNS} rounds over all configurations, median shown; prompts of "
      f"{samples[0]['prefill_long_prompt_tokens']} and {samples[0]['prefill_short_prompt_tokens']} "
      f"tokens; decode over the {DECODE} tokens after the first (greedy)")
if plan_profile["decode_ms_per_layer"]:
    print(f"- `shoal plan` profile (cross-check): {plan_profile['decode_ms_per_layer']:.2f} ms per "
          f"layer decoding, {plan_profile['prefill_ms_per_layer_token']:.3f} ms per layer and prompt token")
print()
print(f"| configuration | split | prefill tok/s ({samples[0]['prefill_long_prompt_tokens']}) "
      f"| prefill tok/s ({samples[0]['prefill_short_prompt_tokens']}) | decode tok/s | × single "
      "| decode tok/s, reply delayed too | stage compute ms/token (decode) | per-hop ms | bytes/token per hop | same text |")
print("|---|---|--:|--:|--:|--:|--:|---|--:|--:|---|")
for r in results:
    print("| " + " | ".join([
        r["config"], ",".join(r["split"]), f(r["prefill_long_tok_s"]), f(r["prefill_short_tok_s"]),
        f(r["decode_tok_s"]), f(r["decode_vs_single"], "{:.2f}"),
        f(r["decode_tok_s_reply_delayed_too"]),
        " + ".join(f"{x:.1f}" for x in r["stage_compute_decode_ms"]),
        f(r["per_hop_ms"], "{:.2f}"),
        str(r["forward_frame_bytes"]) if r["stages"] > 1 else "—",
        "yes" if r["same_text_as_single"] else "NO",
    ]) + " |")
print()
print("| configuration | process | layers | peak RSS MiB | ÷ single process |")
print("|---|---|---|--:|--:|")
for r, c in zip(results, configs):
    names = ["single process" if r["stages"] == 1 else "head"] + \
            [f"stage {i}" for i in range(1, r["stages"])]
    for name, sp, rss, ratio in zip(names, r["split"], r["peak_rss_mib"], r["peak_rss_vs_single"]):
        print(f"| {r['config']} | {name} | {sp} | {f(rss, '{:.0f}')} | {f(ratio, '{:.2f}')} |")
print()
print(f"raw results: {E['JSON_OUT']}")
PYEOF
