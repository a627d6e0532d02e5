#!/usr/bin/env python3
"""Markdown tables for BENCHMARKS.md from the criterion results of `--bench select`,
`--bench compress` and `--bench merge` (selection, compression, masks and merge reductions).

Usage:
  cargo bench -p kernels-benches --bench select
  cargo bench -p kernels-benches --bench compress
  cargo bench -p kernels-benches --bench merge
  python3 benches/issue4_report.py
Every figure is a median; % of STREAM uses the STREAM read measured in the same bench run (each
bench measures its own) with the same thread count.
"""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
THREADS = "2t"
SIZES = (1_000_000, 10_000_000, 100_000_000)


def result(group, bench, threads=THREADS):
    """(median seconds, throughput bytes) of one benchmark, or None."""
    path = root / group / bench / threads / "new"
    if not (path / "estimates.json").exists():
        return None
    median = json.loads((path / "estimates.json").read_text())["median"]["point_estimate"] / 1e9
    throughput = json.loads((path / "benchmark.json").read_text()).get("throughput") or {}
    return median, throughput.get("Bytes")


def stream(group):
    median, nbytes = result(f"{group}_stream", "read_1GiB")
    return nbytes / median / 1e9


def cell(group, bench, stream_gbs):
    r = result(group, bench)
    if r is None:
        return "-"
    median, nbytes = r
    gbs = nbytes / median / 1e9
    return f"{median * 1e3:.2f} ms, {gbs:.1f} GB/s ({100 * gbs / stream_gbs:.0f} %)"


def table(title, group_prefix, rows, dtypes):
    s = stream(group_prefix)
    print(f"#### {title} (STREAM-style read in the same run: {s:.2f} GB/s)\n")
    for dtype in dtypes:
        group = f"{group_prefix}_{dtype}"
        print(f"{dtype}:\n")
        print("| kernel | " + " | ".join(f"n = {n:.0e}".replace("+0", "") for n in SIZES) + " |")
        print("|---|" + "---|" * len(SIZES))
        for label, bench in rows:
            cells = [cell(group, bench.format(n=n), s) for n in SIZES]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()


table(
    "Merge reductions and masks, 2 threads",
    "merge",
    [(f"{name}, N = {m}", f"{key}_n{{n}}_models{m}")
     for name, key in (("weighted mean", "weighted_mean"), ("task arithmetic", "task_arithmetic"),
                       ("TIES election", "ties_elect"), ("Fisher merge", "fisher_merge"))
     for m in (2, 4, 8)]
    + [("Fisher accumulation", "fisher_accumulate_n{n}"), ("DARE p = 0.9", "dare_n{n}"),
       ("TIES trim, density 0.2", "ties_trim_n{n}"), ("Breadcrumbs 0.9 / 0.01", "breadcrumbs_n{n}")],
    ("f32", "bf16"),
)

table(
    "Selection, 2 threads (GB/s count the 4n bytes of f32 read once)",
    "select",
    [(f"{what}, k = {k}", f"{key}_n{{n}}_k{k}")
     for key, what in (("kth", "k-th magnitude"), ("mask", "top-k bitmask"))
     for k in ("1pc", "10pc", "50pc")],
    ("f32",),
)
s = stream("select")
print("Against `select_nth_unstable_by` on |x| over a copy (1 thread), side by side:\n")
print("| n | k | radix k-th (2 threads) | select_nth_unstable (1 thread) | speed-up | radix, % of STREAM (4n / time) |")
print("|---|---|---|---|---|---|")
for n in SIZES:
    for k in ("1pc", "10pc", "50pc"):
        ours = result("select_f32", f"kth_n{n}_k{k}")
        theirs = result("select_f32", f"select_nth_unstable_n{n}_k{k}", "1t")
        if ours and theirs:
            print(f"| {n:.0e} | {k.replace('pc', ' %')} | {ours[0] * 1e3:.2f} ms | {theirs[0] * 1e3:.1f} ms | "
                  f"{theirs[0] / ours[0]:.1f}x | {100 * 4 * n / ours[0] / 1e9 / s:.0f} % |")
print()

table(
    "Compression and packed ternary kernels, 2 threads",
    "compress",
    [("ComPEFT d = 0.1 -> dense 2-bit", "compeft_dense_n{n}"),
     ("ComPEFT d = 0.1 -> sparse Rice", "compeft_rice_n{n}"),
     ("decode dense", "decode_dense_n{n}"), ("decode Rice", "decode_rice_n{n}"),
     ("ternary GEMV from dense", "gemv_dense_n{n}"), ("ternary GEMV from Rice", "gemv_rice_n{n}"),
     ("decompress-add into bf16, dense", "add_bf16_dense_n{n}"),
     ("decompress-add into bf16, Rice", "add_bf16_rice_n{n}")],
    ("f32",),
)
s = stream("compress")
for layout in ("dense", "rice"):
    r = result("compress_f32", f"compeft_{layout}_n100000000")
    if r:
        passes = r[0] / (4e8 / (s * 1e9))
        print(f"ComPEFT of 1e8 f32 into {layout}: {r[0] * 1e3:.1f} ms = the time of {passes:.1f} passes over the task vector at STREAM speed")
