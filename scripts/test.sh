#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (the Python
# `openai`, `anthropic`, `ollama` and `mcp` clients, the models), checks formatting and lints,
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

py=$(command -v python3 || command -v python)
# The official clients the API tests drive, pinned; each installed only where missing.
for pkg in openai==3.54.0 anthropic==2.16.0 ollama==0.6.3 mcp==2.3.0; do
  if ! "$py" -c "import ${pkg%%==*}" 2>/dev/null; then
    echo "== installing the ${pkg%%==*} Python client (used by the API tests)"
    "$py" -m pip install --quiet --disable-pip-version-check "$pkg"
  fi
done

echo "== fetching test models"
scripts/fetch-models.sh smollm2 qwen05 humaneval

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --release --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked --release --workspace
