#!/usr/bin/env python3
"""Prints the linear-algebra tables of BENCHMARKS.md from the last `--bench linalg` run.

Joins criterion's medians (target/criterion/linalg/...) with the FLOP counts and accuracies the
bench wrote to target/criterion/linalg-notes/. `ratio` is faer's median time over ours
(> 1: ours is faster), measured side by side in the same run.
Usage: python3 benches/linalg_report.py
"""
import json
import math
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
notes = {}
for path in sorted((root / "linalg-notes").glob("*.json")):
    notes.update(json.loads(path.read_text()))
EPS = 2.0 ** -23
C = 16.0  # kernels_cpu::linalg::F32_FACTORISATION_TOLERANCE


medians = {}
for estimates in root.glob("**/new/estimates.json"):
    info = json.loads((estimates.parent / "benchmark.json").read_text())
    medians[info["full_id"]] = json.loads(estimates.read_text())["median"]["point_estimate"] / 1e9


def median_s(bench):
    return medians.get(bench)


def bound(shape):
    m, n = (int(x) for x in shape.split("/")[0].split("x"))
    return C * EPS * math.sqrt(max(m, n))


stream = median_s("linalg/stream/read_1GiB/2t")
stream_gbs = (1 << 30) / stream / 1e9 if stream else float("nan")
print(f"STREAM read (same run): {stream_gbs:.1f} GB/s")
gemm = {}
for label in ["faer", "portable"]:
    t = median_s(f"linalg/gemm/{label}/2048")
    if t:
        gemm[label] = notes[f"linalg/gemm/{label}/2048"]["flops"] / t / 1e9
        print(f"GEMM 2048^3 ({label}): {t * 1e3:.1f} ms, {gemm[label]:.0f} GFLOP/s")

print()
print("| op | shape | ours (ms) | faer (ms) | ratio | ours GFLOP/s | % of GEMM | accuracy (bound) |")
print("|---|---|---|---|---|---|---|---|")
rows = [
    ("qr", "householder", "4096x256"),
    ("qr", "cgs2", "4096x256"),
    *[("qr", label, f"{m}x16/{t}t") for t in (2, 1) for m in (4096, 11008) for label in ("householder", "cgs2")],
    ("thin_svd", "kernels", "1024x1024"),
    ("thin_svd", "kernels", "4096x512"),
    ("rsvd", "kernels", "4096x4096/r64"),
    ("rsvd", "kernels", "4096x11008/r64"),
    ("rsvd", "kernels", "4096x11008/r64/q64"),
    ("rsvd", "kernels", "4096x11008/r16/1t"),
    ("lu", "kernels", "2048x2048"),
]
for op, label, shape in rows:
    ours = median_s(f"linalg/{op}/{label}/{shape}")
    faer = median_s(f"linalg/{op}/faer/{shape}")
    if ours is None:
        continue
    note = notes.get(f"linalg/{op}/{label}/{shape}", {})
    gflops = note.get("flops", float("nan")) / ours / 1e9
    accuracy = ", ".join(
        f"{k} {v:.4f}" if k == "error_over_optimal" else f"{k} {v:.1e}"
        for k, v in note.items()
        if k not in ("flops", "bytes")
    )
    if op != "rsvd":
        accuracy += f" ({bound(shape):.1e})"
    else:
        accuracy += " (1.1)"
    extra = ""
    if "bytes" in note:
        gbs = note["bytes"] / ours / 1e9
        extra = f"; {gbs:.1f} GB/s = {100 * gbs / stream_gbs:.0f} % of STREAM"
    ratio = f"{faer / ours:.2f}" if faer else "-"
    faer_ms = f"{faer * 1e3:.1f}" if faer else "-"
    print(
        f"| {op} ({label}) | {shape} | {ours * 1e3:.1f} | {faer_ms} | {ratio} | {gflops:.0f}{extra} "
        f"| {100 * gflops / gemm.get('faer', float('nan')):.0f} % | {accuracy} |"
    )
for shape in ["4096x4096/r64", "4096x11008/r64"]:
    ours = median_s(f"linalg/rsvd/kernels/{shape}")
    exact = median_s(f"linalg/exact_svd/faer/{shape.split('/')[0]}")
    if ours and exact:
        faer_error = notes.get(f"linalg/rsvd/faer/{shape}", {}).get("error_over_optimal", float("nan"))
        print(
            f"\nrSVD {shape}: faer exact thin SVD {exact:.2f} s, ours {ours * 1e3:.0f} ms: "
            f"{exact / ours:.1f}x faster; faer's composed rSVD error/optimal {faer_error:.4f}"
        )

print()
print("Projections of 4096 x 11008 (cold; GB/s count X read once and the result written once)")
print()
print(
    "| op | r | threads | ours (ms) | ours in place (ms) | faer (ms) | faer in place (ms) "
    "| ratio (faer in place / ours in place) | ours in place: GB/s, % of STREAM | residual (bound) |"
)
print("|---|---|---|---|---|---|---|---|---|---|")
for op in ["project_out", "project_onto"]:
    for r, threads in [(16, 2), (16, 1), (64, 2), (256, 2)]:
        shape = f"4096x11008/r{r}/{threads}t"
        times = {label: median_s(f"linalg/{op}/{label}/{shape}") for label in
                 ["kernels", "kernels_in_place", "faer", "faer_in_place"]}
        if times["kernels_in_place"] is None:
            continue
        note = notes.get(f"linalg/{op}/kernels/{shape}", {})
        gbs = note.get("bytes", float("nan")) / times["kernels_in_place"] / 1e9
        ms = {k: f"{v * 1e3:.1f}" if v else "-" for k, v in times.items()}
        ratio = times["faer_in_place"] / times["kernels_in_place"] if times["faer_in_place"] else float("nan")
        print(
            f"| {op} | {r} | {threads} | {ms['kernels']} | {ms['kernels_in_place']} | {ms['faer']} "
            f"| {ms['faer_in_place']} | {ratio:.2f} | {gbs:.1f}, {100 * gbs / stream_gbs:.0f} % "
            f"| {note.get('residual', float('nan')):.1e} ({bound(shape):.1e}) |"
        )
