#!/usr/bin/env bash
# Shoal against llama.cpp on the same GGUF files, in the same run (issue #2 item 6).
#
# Builds `shoal` (release) and the bench-only `bench/llama-ref` (llama.cpp from
# source through the llama-cpp-2 crate; needs cmake and libclang, e.g.
# `apt-get install -y cmake libclang-dev`; the first build takes several minutes),
# then for every model × threads × prompt length runs the two ALTERNATELY, one
# process at a time, and prints a Markdown table of the medians over processes.
# Ratios are shoal / llama.cpp: above 1 means shoal is faster (tok/s) or uses
# more memory (RSS).
#
# Usage: scripts/bench-vs-llama.sh [--long] [--no-build] [--runs N] [--repeat R] [--wait-idle P]
#   --long       also prompt length 512 (default: 64 only)
#   --no-build   use the binaries already built
#   --runs N     processes per engine and configuration (default 3)
#   --repeat R   repetitions inside each process; it reports their median (default 2)
#   --wait-idle P before each pair of processes, wait (at most 10 min) until other
#                processes use less than P% of all cores (2 s sample; shared machines)
# Env: SHOAL_MODELS_DIR (default <repo>/models), BENCH_THREADS (default "1 2"),
#      BENCH_DECODE_TOKENS (default 128), BENCH_KEEP (keep raw results in this dir),
#      BENCH_PROMPTS (prompt lengths, e.g. "512 4096 16384"; overrides --long),
#      BENCH_MODELS (files in the models dir, default SmolLM2 and Qwen2.5-Coder-0.5B)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
models_dir=${SHOAL_MODELS_DIR:-$repo/models}

long=0 build=1 runs=3 repeat=2 wait_idle=
while (($#)); do
  case $1 in
    --long) long=1 ;;
    --no-build) build=0 ;;
    --runs) runs=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --wait-idle) wait_idle=$2; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

threads_list=${BENCH_THREADS:-"1 2"}
decode_tokens=${BENCH_DECODE_TOKENS:-128}
prompts=(64)
((long)) && prompts+=(512)
# Long contexts (issue #17): e.g. BENCH_PROMPTS="512 4096 16384".
[[ -n ${BENCH_PROMPTS:-} ]] && read -r -a prompts <<<"$BENCH_PROMPTS"
models=(smollm2-135m-instruct-q4_1.gguf qwen2.5-coder-0.5b-instruct.gguf)
# Other files of models/, e.g. BENCH_MODELS="qwen2.5-coder-1.5b-instruct.gguf".
[[ -n ${BENCH_MODELS:-} ]] && read -r -a models <<<"$BENCH_MODELS"

shoal=$repo/target/release/shoal
llama=$repo/bench/llama-ref/target/release/llama-ref

if ((build)); then
  echo "building shoal (release)…" >&2
  cargo build --release --quiet -p shoal
  echo "building llama-ref (release; llama.cpp from source, slow the first time)…" >&2
  (cd bench/llama-ref && cargo build --release --quiet)
fi
for bin in "$shoal" "$llama"; do
  [[ -x $bin ]] || { echo "missing $bin (run without --no-build)" >&2; exit 1; }
done

# Run private copies: others may rebuild target/release/shoal while this runs.
work=${BENCH_KEEP:-$(mktemp -d)}
mkdir -p "$work"
[[ -n ${BENCH_KEEP:-} ]] || trap 'rm -rf "$work"' EXIT
cp "$shoal" "$work/shoal" && shoal=$work/shoal
cp "$llama" "$work/llama-ref" && llama=$work/llama-ref

missing=0
for m in "${models[@]}"; do [[ -f $models_dir/$m ]] || missing=1; done
if ((missing)); then
  SHOAL_MODELS_DIR=$models_dir scripts/fetch-models.sh smollm2 qwen05 qwen15 >&2
fi

results=$work/results.jsonl
: >"$results"

# Percentage of all cores busy over a 2-second sample (from /proc/stat).
busy_pct() {
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  sleep 2
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x); split(b, y);
    busy = y[1] - x[1]; idle = y[2] - x[2];
    printf "%d\n", (busy + idle) ? 100 * busy / (busy + idle) : 0 }'
}

# Wait until the machine is quiet enough, if --wait-idle was given.
settle() {
  [[ -n $wait_idle ]] || return 0
  local i pct
  for ((i = 0; i < 240; i++)); do
    pct=$(busy_pct)
    ((pct < wait_idle)) && return 0
    ((i % 15 == 0)) && echo "  waiting: other processes use ${pct}% of the CPU…" >&2
  done
  echo "  still ${pct}% busy after 10 min; going on" >&2
}

cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
echo "## shoal vs llama.cpp"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- machine: ${cpu:-unknown CPU}, $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg); CPU busy (2 s sample): $(busy_pct)%"
echo "- shoal: tree $(git describe --always --dirty 2>/dev/null || echo unknown), binary built $(date -u -r "$repo/target/release/shoal" '+%H:%M UTC')"
echo "- llama.cpp: llama-cpp-2 $(sed -n 's/^llama-cpp-2 = { version = "\([^"]*\)".*/\1/p' bench/llama-ref/Cargo.toml), CPU, GGML_NATIVE, OpenMP"
echo "- method: ${runs} processes per engine, alternating, each the median of ${repeat} repetitions;" \
  "table shows the median over processes; ${decode_tokens} greedy decode tokens; ratio = shoal / llama.cpp"
echo

# run ENGINE MODEL THREADS PROMPT: one process, its JSON appended to $results.
run() {
  local engine=$1 model=$2 threads=$3 prompt=$4 out
  case $engine in
    shoal)
      out=$("$shoal" --threads "$threads" bench --model "$models_dir/$model" \
        --prompt-tokens "$prompt" --decode-tokens "$decode_tokens" --repeat "$repeat" --json \
        2>>"$work/shoal.log") || { echo "shoal failed:" >&2; tail -20 "$work/shoal.log" >&2; exit 1; }
      ;;
    llama)
      out=$("$llama" --model "$models_dir/$model" --threads "$threads" \
        --prompt-tokens "$prompt" --decode-tokens "$decode_tokens" --repeat "$repeat" --json \
        2>>"$work/llama.log") || { echo "llama-ref failed:" >&2; tail -20 "$work/llama.log" >&2; exit 1; }
      ;;
  esac
  ENGINE=$engine FILE=$model PROMPT=$prompt THREADS=$threads python3 -c '
import json, os, sys
r = json.loads(sys.stdin.read())
r["engine"] = os.environ["ENGINE"]
r["file"] = os.environ["FILE"]
r["config_threads"] = int(os.environ["THREADS"])
r["config_prompt"] = int(os.environ["PROMPT"])
print(json.dumps(r))' <<<"$out" >>"$results"
}

for model in "${models[@]}"; do
  for threads in $threads_list; do
    for prompt in "${prompts[@]}"; do
      echo "running $model, $threads threads, prompt $prompt…" >&2
      for ((i = 0; i < runs; i++)); do
        settle
        run shoal "$model" "$threads" "$prompt"
        run llama "$model" "$threads" "$prompt"
      done
    done
  done
done

python3 - "$results" <<'EOF'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
groups = {}
for r in rows:
    key = (r["file"], r["config_threads"], r["config_prompt"])
    groups.setdefault(key, {}).setdefault(r["engine"], []).append(r)

def med(rs, k):
    return statistics.median(r[k] for r in rs)

def ratio(a, b):
    return f"{a / b:.2f}" if b else "—"

print("| model | threads | prompt | shoal prefill tok/s | llama.cpp prefill tok/s | ratio "
      "| shoal decode tok/s | llama.cpp decode tok/s | ratio "
      "| shoal peak RSS MiB | llama.cpp peak RSS MiB | ratio |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for (file, threads, prompt), g in groups.items():
    s, l = g.get("shoal", []), g.get("llama", [])
    if not s or not l:
        continue
    cells = [file.removesuffix(".gguf"), str(threads), str(prompt)]
    for k, fmt in (("prefill_tokens_per_s", "{:.1f}"), ("decode_tokens_per_s", "{:.1f}"),
                   ("peak_rss_mib", "{:.0f}")):
        a, b = med(s, k), med(l, k)
        cells += [fmt.format(a), fmt.format(b), ratio(a, b)]
    print("| " + " | ".join(cells) + " |")

# A process that shared the cores with something else reads far off its siblings
# (llama.cpp's OpenMP threads spin at barriers and collapse under contention);
# the median absorbs one such outlier, but say so rather than hide it.
noisy = []
for (file, threads, prompt), g in groups.items():
    for engine, rs in sorted(g.items()):
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            xs = [r[k] for r in rs]
            if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 1.5:
                noisy.append(f"{file.removesuffix('.gguf')} t{threads} p{prompt} {engine} "
                             f"{k.split('_')[0]}: " + ", ".join(f"{x:.1f}" for x in xs))
if noisy:
    print()
    print("Noisy (processes differ by more than 1.5x; the median is shown above):")
    for n in noisy:
        print(f"- {n}")
EOF
echo
echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
