#!/usr/bin/env python3
"""Markdown tables for BENCHMARKS.md from the criterion results of `--bench gemv`.

Usage: cargo bench -p kernels-benches --bench gemv && python3 benches/gemv_report.py
Every figure is a median; % of STREAM uses the STREAM read measured in the same run with the
same thread count.
"""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"


def median_s(group, bench, threads):
    path = root / group / bench / f"{threads}t" / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e9


stream = {t: (1 << 30) / median_s("stream", "read_1GiB", t) / 1e9 for t in (1, 2)}
print(f"STREAM-style read, 1 GiB: {stream[1]:.2f} GB/s (1 thread), {stream[2]:.2f} GB/s (2 threads)\n")

SHAPES = {"Llama-2-7B": (11008, 4096), "SmolLM2-135M": (1536, 576)}
SIZE = {"f32": 4, "bf16": 2}

for model, (inter, hidden) in SHAPES.items():
    for temp in ("cold", "hot"):
        rows = []
        for dtype in ("f32", "bf16"):
            group = f"gemv_{model}_{temp}_{dtype}"
            for t in (1, 2):
                dense = median_s(group, "dense", t)
                if dense is None:
                    continue
                nbytes = inter * hidden * SIZE[dtype]
                gbs = nbytes / dense / 1e9
                cells = [f"{dtype}", f"{t}", f"{dense * 1e3:.3f}", f"{gbs:.2f}", f"{100 * gbs / stream[t]:.1f}"]
                for s in (0.5, 0.7, 0.9):
                    sparse = median_s(group, f"sparse_input_s{s}", t)
                    bound = 1.15 * (1 - s) * dense + 5e-6
                    cells.append(f"{sparse * 1e3:.3f} ({dense / sparse:.2f}x, {'met' if sparse <= bound else 'missed'})")
                rows.append(cells)
        if not rows:
            continue
        print(f"#### GEMV, {model} ({inter} x {hidden}), {temp}\n")
        print("| weights | threads | dense ms | dense GB/s | % of STREAM | sparse s=0.5 ms (speed-up, bound) | s=0.7 | s=0.9 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print()
        f32 = median_s(f"gemv_{model}_{temp}_f32", "dense", 2)
        bf16 = median_s(f"gemv_{model}_{temp}_bf16", "dense", 2)
        if f32 and bf16:
            print(f"bf16 over f32, dense, 2 threads: {f32 / bf16:.2f}x\n")

    rows = []
    for dtype in ("f32", "bf16"):
        group = f"mlp_{model}_cold_{dtype}"
        for t in (1, 2):
            dense = median_s(group, "cats_s0", t)
            if dense is None:
                continue
            nbytes = 3 * inter * hidden * SIZE[dtype]
            gbs = nbytes / dense / 1e9
            cells = [dtype, f"{t}", f"{dense * 1e3:.3f}", f"{gbs:.2f}", f"{100 * gbs / stream[t]:.1f}"]
            for s in (0.5, 0.7, 0.9):
                v = median_s(group, f"cats_s{s}", t)
                cells.append(f"{v * 1e3:.3f} ({dense / v:.2f}x)")
            teal = median_s(group, "teal_s0.5", t)
            cells.append(f"{teal * 1e3:.3f} ({dense / teal:.2f}x)")
            rows.append(cells)
    if rows:
        print(f"#### MLP, {model}, cold (CATS at t < 0 is the dense MLP)\n")
        print("| weights | threads | dense ms | GB/s | % of STREAM | CATS s=0.5 | CATS s=0.7 | CATS s=0.9 | TEAL s=0.5 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print()
