#!/usr/bin/env bash
# Issue 15's decode tables, ours and llama.cpp's in the same run: `--bin decode` (SmolLM2-135M
# f32/bf16 and a Llama-2-7B-shaped model, STREAM measured first), then llama.cpp on the same
# SmolLM2 weights when LLAMA_PYTHON names a Python with llama-cpp-python 0.3.36 (built from
# source as BENCHMARKS.md says).
#
# Run: LLAMA_PYTHON=/path/to/venv/bin/python bash benches/decode.sh   (about 15 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$MODEL" ] || bash scripts/fetch-smollm2.sh
cargo build --release -q -p kernels-benches --bin decode
target/release/decode "$MODEL"
if [ -n "${LLAMA_PYTHON:-}" ]; then
    echo
    "$LLAMA_PYTHON" benches/llama_cpp_decode.py "$MODEL" "${RUNS:-3}"
else
    echo "LLAMA_PYTHON not set: llama.cpp skipped"
fi
