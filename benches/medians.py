#!/usr/bin/env python3
"""Prints the median time and GB/s of every criterion benchmark under target/criterion.

Criterion's summary line shows the mean and GiB/s; BENCHMARKS.md reports medians in decimal GB/s.
Usage: python3 benches/medians.py [filter]
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
pattern = sys.argv[1] if len(sys.argv) > 1 else ""
for estimates in sorted(root.glob("**/new/estimates.json")):
    bench = estimates.parent.parent.relative_to(root).as_posix()
    if pattern not in bench:
        continue
    median_s = json.loads(estimates.read_text())["median"]["point_estimate"] / 1e9
    info = json.loads((estimates.parent / "benchmark.json").read_text())
    throughput = info.get("throughput") or {}
    line = f"{bench:60s} median {median_s * 1e3:10.3f} ms"
    if "Bytes" in throughput:
        line += f"  {throughput['Bytes'] / median_s / 1e9:7.2f} GB/s"
    if "Elements" in throughput:
        line += f"  {throughput['Elements'] / median_s / 1e9:7.3f} G elements/s"
    print(line)
