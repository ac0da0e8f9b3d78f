#!/usr/bin/env bash
# Infinity (infinity-emb, torch engine, CPU) in its own venv, for `bench_serve.py --compare-variants --infinity`.
# Its own venv because its pins (numpy<2, sentence-transformers<4) conflict with the project's.
# Usage: bash bench/setup_infinity.sh [VENV]   (default .venv-infinity; prints the executable's path)
set -euo pipefail
venv=${1:-.venv-infinity}
if [ ! -x "$venv/bin/infinity_emb" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "infinity-emb[server,torch]==0.0.78" "torch==2.13.0"  # pinned torch = the CPU wheel
fi
echo "$venv/bin/infinity_emb"
