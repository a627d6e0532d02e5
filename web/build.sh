#!/usr/bin/env bash
# Builds the demo page from a clean checkout into target/web/ (serve that folder):
#   bash web/build.sh && python3 -m http.server -d target/web 8000
# Installs the wasm32 target and wasm-bindgen-cli at the version Cargo.lock pins (the CLI must
# match the wasm-bindgen library exactly), builds kernels-web for wasm32 with simd128 (the CPU
# fallback's kernels), generates the JavaScript bindings, and copies the page. No bundler: the page
# is one ES module that imports the generated one.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ -z "$version" ]; then
    echo "Cargo.lock pins no wasm-bindgen" >&2
    exit 1
fi
rustup target add wasm32-unknown-unknown
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }')" != "$version" ]; then
    # Not --locked: the CLI's own lock file may name dependency versions a registry mirror lacks.
    cargo install wasm-bindgen-cli --version "$version"
fi

# simd128 for the CPU kernels; getrandom's browser backend for the tokenizer's `rand`.
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS='-C target-feature=+simd128 --cfg getrandom_backend="wasm_js"' \
    cargo build -p kernels-web --target wasm32-unknown-unknown --release
out=target/web
rm -rf "$out"
mkdir -p "$out"
wasm-bindgen --target web --no-typescript --out-dir "$out/pkg" \
    target/wasm32-unknown-unknown/release/kernels_web.wasm
cp web/www/* "$out/"
echo "built $out: serve it with python3 -m http.server -d $out 8000"
