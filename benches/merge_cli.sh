#!/usr/bin/env bash
# `kernels merge` on models whose tensors total over 4 GiB (issue 14): a synthetic Llama-shaped
# base and three fine-tunes (10 layers, hidden 2048, MLP 5632, vocabulary 32000: 645 M parameters,
# 1.29 GB each in bf16; 5.16 GB in all), merged with linear and TIES, three runs each. Prints the
# page-cached read bandwidth of the inputs (`cat` of every shard, a second time, into /dev/null),
# and the write bandwidth of a file of the output's size, then per run the wall time, the peak
# RSS and the merge's GB/s (bytes read plus written, over the wall time). The inputs are in the
# page cache for every run, as they are for the bandwidth figure.
#
# Run: bash benches/merge_cli.sh [WORK_DIR]   (default target/merge-bench; about 12 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-target/merge-bench}"
RUNS="${RUNS:-3}"
cargo build --release -q -p kernels-cli
K=target/release/kernels
mkdir -p "$WORK"
if [ ! -d "$WORK/zoo" ]; then
    "$K" synthetic --layers 10 --hidden 2048 --intermediate 5632 --vocab 32000 \
        --finetunes 3 "$WORK/zoo"
fi
shards=("$WORK"/zoo/*/*.safetensors)
bytes=$(cat "${shards[@]}" | wc -c)
start=$(date +%s.%N)
cat "${shards[@]}" > /dev/null
end=$(date +%s.%N)
awk -v b="$bytes" -v s="$start" -v e="$end" \
    'BEGIN { printf "inputs: %.0f bytes; page-cached read (cat): %.2f GB/s\n", b, b / (e - s) / 1e9 }'
# The write side: a file of the output's size (one model) written through the page cache, as
# the merge writes its shards. Writes are throttled by the disk once dirty pages pile up, so this
# figure moves from run to run; it is measured here, beside the merges it bounds.
out_bytes=$(cat "$WORK"/zoo/base/*.safetensors | wc -c)
start=$(date +%s.%N)
head -c "$out_bytes" /dev/zero > "$WORK/write-test"
end=$(date +%s.%N)
rm -f "$WORK/write-test"
awk -v b="$out_bytes" -v s="$start" -v e="$end" \
    'BEGIN { printf "output: %.0f bytes; page-cached write (head > file): %.2f GB/s\n", b, b / (e - s) / 1e9 }'

cat > "$WORK/linear.yml" <<YAML
merge_method: linear
models:
  - model: $WORK/zoo/base
    parameters: {weight: 1.0}
  - model: $WORK/zoo/ft1
    parameters: {weight: 1.0}
  - model: $WORK/zoo/ft2
    parameters: {weight: 1.0}
YAML
cat > "$WORK/ties.yml" <<YAML
merge_method: ties
base_model: $WORK/zoo/base
models:
  - model: $WORK/zoo/ft1
    parameters: {weight: 1.0, density: 0.2}
  - model: $WORK/zoo/ft2
    parameters: {weight: 1.0, density: 0.2}
  - model: $WORK/zoo/ft3
    parameters: {weight: 1.0, density: 0.2}
YAML
for method in linear ties; do
    for run in $(seq "$RUNS"); do
        /usr/bin/time -f "$method run $run: wall %e s, peak RSS %M KB" \
            "$K" merge -q --force "$WORK/$method.yml" "$WORK/merged-$method"
    done
done
