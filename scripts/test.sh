#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (the Python
# `openai` client, the models), checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

py=$(command -v python3 || command -v python)
if ! "$py" -c "import openai" 2>/dev/null; then
  echo "== installing the openai Python client (used by the API tests)"
  "$py" -m pip install --quiet --disable-pip-version-check "openai==3.54.0"
fi

echo "== fetching test models"
scripts/fetch-models.sh smollm2 qwen05 humaneval

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --release --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked --release --workspace
