#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (the Python
# `openai`, `anthropic`, `ollama` and `mcp` clients, Jinja2 as the reference renderer of
# chat templates, Playwright and Chromium for the dashboard, npm for the opencode agent,
# the models), checks formatting and lints, then
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

py=$(command -v python3 || command -v python)
# The official clients the API tests drive (and Jinja2, which renders chat templates as
# transformers does), pinned; each installed only where missing.
for pkg in openai==3.54.0 anthropic==2.16.0 ollama==0.6.3 mcp==2.3.0 playwright==1.65.2 jinja2==3.1.6; do
  if ! "$py" -c "import ${pkg%%==*}" 2>/dev/null; then
    echo "== installing the ${pkg%%==*} Python client (used by the API tests)"
    "$py" -m pip install --quiet --disable-pip-version-check "$pkg"
  fi
done

# The dashboard test drives Debian's Chromium through Playwright (Playwright's own browser
# download needs more of the internet than the package registries).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (used by the dashboard test)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
    || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; }
fi

# The opencode test installs the agent from npm (into target/opencode) itself; the node that
# comes with npm also runs verify's JavaScript checks in the sandbox (their tests need it).
if ! command -v npm >/dev/null 2>&1; then
  echo "== installing node and npm (the opencode test, verify's JavaScript checks)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null \
    || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null; }
fi

echo "== fetching test models"
scripts/fetch-models.sh smollm2 qwen05 qwen15 humaneval mbpp

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --release --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked --release --workspace

# On a CPU with AMX int8 tiles, `--amx` puts prompt products on them (other numbers than
# llama.cpp's by design: docs/PERFORMANCE.md). The engine's own equalities must still
# hold there — prompts in chunks and from the cache, batches, speculation, recovery, a
# ring against one process — so the suites that check them run again with SHOAL_AMX=1.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  echo "== cargo test, prompt products on AMX tiles (SHOAL_AMX=1)"
  SHOAL_AMX=1 cargo test --locked --release -p shoal-engine --test prefix_cache --test speculation --test batch
  SHOAL_AMX=1 cargo test --locked --release -p shoal-pipeline --test ring --test prompt_cache
fi
