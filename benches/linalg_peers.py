#!/usr/bin/env python3
"""The linear-algebra peers that are not Rust: SciPy's BLAS and LAPACK (the OpenBLAS numpy ships)
composed in their strongest form, on the shapes of `cargo bench --bench linalg`.

Projections (`linalg/project`):

`X -= Q (Q^T X)` is two `sgemm` calls: `C = Q^T X`, then `X = -Q C + X` in place (`beta = 1`,
`overwrite_c`), on Fortran-ordered arrays so BLAS touches them without a copy; `Q (Q^T X)` writes
into a preallocated output. Cold as the Rust bench: each call takes the next of three copies of X
(540 MB). Prints medians of 10 calls, one line per (op, rank, threads).

Thin QR (`linalg/qr`, 4096 x 16 and 11008 x 16): `scipy.linalg.qr(mode="economic")` on a
Fortran-ordered copy (LAPACK's own layout, faster than C order here), Q and R formed as ours are.
Median of 200 calls.

Randomized SVD (`linalg/rsvd`, 4096 x 11008): the same algorithm by hand, the same probes and
power iterations: `Y = A Omega` (numpy's normal draws, inside the timing as ours are), economic
QR after every product, `B = Q^T A`, `svd(B, lapack_driver="gesdd")`, `U = Q U_B`. `A` is
C-ordered as ours is row-major. Median of 7 calls.

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
QR_CASES = [(4096, 16, 2), (11008, 16, 2), (4096, 16, 1), (11008, 16, 1)]
# (rank, probes, threads), as `linalg/rsvd/kernels/4096x11008/{r64, r64/q64, r16/1t}`.
RSVD_CASES = [(64, 128, 2), (64, 64, 2), (16, 32, 1)]
POWER_ITERATIONS = 2


def median_of(f, calls, skip):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    times = sorted(times[skip:])
    return times[len(times) // 2]


def run_qr(m, n, threads):
    import numpy as np
    from scipy.linalg import qr

    a = np.asfortranarray(np.random.default_rng(m).standard_normal((m, n), dtype=np.float32))

    def factor():
        q, r = qr(a, mode="economic", check_finite=False)
        assert q.dtype == np.float32 and r.shape == (n, n)

    t = median_of(factor, 200, 20)
    print(f"scipy qr {m}x{n} {threads}t: {t * 1e6:.0f} us", flush=True)


def run_rsvd(rank, probes, threads):
    import numpy as np
    from scipy.linalg import qr, svd

    rng = np.random.default_rng(rank)
    a = rng.standard_normal((M, N), dtype=np.float32)

    def rsvd():
        omega = rng.standard_normal((N, probes), dtype=np.float32)
        q, _ = qr(a @ omega, mode="economic", check_finite=False)
        for _ in range(POWER_ITERATIONS):
            z, _ = qr(a.T @ q, mode="economic", check_finite=False)
            q, _ = qr(a @ z, mode="economic", check_finite=False)
        u_b, s, vt = svd(q.T @ a, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        u = q @ u_b[:, :rank]
        assert u.dtype == np.float32 and s.shape == (probes,)

    t = median_of(rsvd, 7, 1)
    print(f"scipy rsvd {M}x{N} r{rank} q{probes} {threads}t: {t * 1e3:.1f} ms", flush=True)


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
    if len(sys.argv) > 1:
        kind, *args = sys.argv[1:]
        {"project": run, "qr": run_qr, "rsvd": run_rsvd}[kind](*map(int, args))
    else:
        jobs = [("project", rank, threads) for rank, threads in CASES]
        jobs += [("qr", m, n, threads) for m, n, threads in QR_CASES]
        jobs += [("rsvd", rank, probes, threads) for rank, probes, threads in RSVD_CASES]
        for kind, *args in jobs:
            threads = args[-1]
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
            subprocess.run([sys.executable, __file__, kind, *map(str, args)], env=env, check=True)
