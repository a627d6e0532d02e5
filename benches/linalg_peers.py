#!/usr/bin/env python3
"""The projection peers that are not Rust: SciPy's BLAS (the OpenBLAS numpy ships) composed in its
strongest form, on the shapes of `cargo bench --bench linalg -- linalg/project`.

`X -= Q (Q^T X)` is two `sgemm` calls: `C = Q^T X`, then `X = -Q C + X` in place (`beta = 1`,
`overwrite_c`), on Fortran-ordered arrays so BLAS touches them without a copy; `Q (Q^T X)` writes
into a preallocated output. Cold as the Rust bench: each call takes the next of three copies of X
(540 MB). Prints medians of 10 calls, one line per (op, rank, threads).

Usage (numpy and scipy from PyPI):
    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install numpy scipy
    /tmp/peers/bin/python benches/linalg_peers.py
"""
import os
import subprocess
import sys
import time

M, N = 4096, 11008
CASES = [(16, 2), (16, 1), (64, 2), (256, 2)]


def run(rank, threads):
    import numpy as np
    from scipy.linalg import blas, qr

    rng = np.random.default_rng(rank)
    copies = [np.asfortranarray(rng.standard_normal((M, N), dtype=np.float32)) for _ in range(3)]
    q, _ = qr(rng.standard_normal((M, rank), dtype=np.float32), mode="economic")
    q = np.asfortranarray(q, dtype=np.float32)
    out = np.zeros((M, N), dtype=np.float32, order="F")

    def project_out(x):
        c = blas.sgemm(1.0, q, x, trans_a=1)
        y = blas.sgemm(-1.0, q, c, beta=1.0, c=x, overwrite_c=1)
        assert np.shares_memory(y, x), "sgemm copied X"

    def project_onto(x):
        c = blas.sgemm(1.0, q, x, trans_a=1)
        y = blas.sgemm(1.0, q, c, beta=0.0, c=out, overwrite_c=1)
        assert np.shares_memory(y, out), "sgemm copied the output"

    for name, f in [("project_out_in_place", project_out), ("project_onto", project_onto)]:
        times = []
        for i in range(12):
            x = copies[i % 3]
            start = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - start)
        median = sorted(times[2:])[len(times[2:]) // 2]
        print(f"scipy {name} {M}x{N} r{rank} {threads}t: {median * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        run(int(sys.argv[1]), int(sys.argv[2]))
    else:
        for rank, threads in CASES:
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
            subprocess.run([sys.executable, __file__, str(rank), str(threads)], env=env, check=True)
