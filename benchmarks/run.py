"""fusedlora benchmark: every provider of a case timed in one run against the base GEMM alone.

    python benchmarks/run.py            headline rows (GPU) / kernel check on tiny shapes (CPU)
    python benchmarks/run.py --full     the whole grid of shapes, M and r

On a CUDA GPU each row is the median of CUDA-event timings (triton.testing.do_bench, warm-up
excluded, L2 flushed between calls) and results go to benchmarks/results/<gpu>.json. Without a GPU
the same providers run through the Triton interpreter on tiny shapes and are checked against the
float64 reference; no timings are printed, because interpreter timings mean nothing.
"""
import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from providers import flops, make_case  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# Real projections: (K, N) of 8B-class (4096 hidden, 14336 MLP) and 70B-class (8192, 28672) models.
SHAPES = {"headline": [(4096, 4096)],
          "full": [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]}
MS = {"headline": [16, 8192], "full": [1, 16, 64, 256, 2048, 4096, 8192, 16384]}
RANKS = {"headline": [16], "full": [8, 16, 64, 128]}
CPU_GRID = [(37, 70, 45, 3), (64, 128, 96, 16)]  # (M, K, N, r), edges included
# Relative error a provider may show against float64 (METHOD.md: fp32 far under 1e-3, tf32 about
# 3e-4, bf16 operands 1e-3 to 1e-2).
REL_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASES = ("fwd", "fwd_bwd")


def grid(full):
    """(case, M, K, N, r, dtype name) rows; fp16 on a subset (the 8B square shape)."""
    size = "full" if full else "headline"
    rows = []
    for case in CASES:
        for K, N in SHAPES[size]:
            for M in MS[size]:
                for r in RANKS[size]:
                    rows.append((case, M, K, N, r, "bf16"))
                    if full and (K, N) == (4096, 4096) and r == 16:
                        rows.append((case, M, K, N, r, "fp16"))
    return rows


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header():
    return {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_case(case, M, K, N, r, dtype_name):
    """One row per provider, all timed in this process, with ratio_to_base filled in."""
    providers, check = make_case(case, M, K, N, r, DTYPES[dtype_name], "cuda")
    rows = []
    for name, fn in providers.items():
        err = check(name)
        if not err <= REL_TOL[DTYPES[dtype_name]]:
            raise AssertionError(f"{case} {name} M={M} K={K} N={N} r={r}: relative error {err:.2e}")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        rows.append(dict(case=case, provider=name, M=M, K=K, N=N, r=r, dtype=dtype_name, adapters=1,
                         ms=ms, tflops=flops(case, name, M, K, N, r) / ms * 1e-9, peak_mb=peak_mb))
    base_ms = next(row["ms"] for row in rows if row["provider"] == "base")
    for row in rows:
        row["ratio_to_base"] = row["ms"] / base_ms
    return rows


def check_on_cpu():
    """Tiny shapes through the interpreter: every provider against float64, no timings."""
    rows = []
    for case in CASES:
        for M, K, N, r in CPU_GRID:
            for dtype_name in ("fp32", "bf16"):
                providers, check = make_case(case, M, K, N, r, DTYPES[dtype_name], "cpu", rotate=False)
                for name in providers:
                    err = check(name)
                    ok = err <= REL_TOL[DTYPES[dtype_name]]
                    print(f"{case:8} {name:10} M={M:<4} K={K:<4} N={N:<4} r={r:<3} {dtype_name}  "
                          f"rel err {err:.1e}  {'ok' if ok else 'WRONG'}", flush=True)
                    rows.append(dict(case=case, provider=name, M=M, K=K, N=N, r=r, dtype=dtype_name,
                                     adapters=1, ms=None, tflops=None, ratio_to_base=None, peak_mb=None,
                                     rel_err=err))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole grid instead of the headline rows")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default on GPU: benchmarks/results/<gpu>.json)")
    args = parser.parse_args(argv)
    if not CUDA:
        print("No CUDA GPU: checking every provider through the Triton interpreter on tiny shapes.")
        rows = check_on_cpu()
        bad = [row for row in rows if row["rel_err"] > REL_TOL[DTYPES[row["dtype"]]]]
        print(f"{len(rows) - len(bad)} of {len(rows)} provider checks agree with the float64 reference.")
        print("No timings: they need a CUDA GPU (interpreter timings mean nothing). Run this command on one.")
        if args.out:
            args.out.write_text(json.dumps({**header(), "rows": rows}, indent=1))
        return 1 if bad else 0
    rows = []
    todo = grid(args.full)
    for i, spec in enumerate(todo, 1):
        for row in time_case(*spec):
            rows.append(row)
            print(f"[{i}/{len(todo)}] {row['case']:8} {row['provider']:10} M={row['M']:<6} K={row['K']:<6} "
                  f"N={row['N']:<6} r={row['r']:<4} {row['dtype']}  {row['ms']:8.4f} ms  "
                  f"{row['tflops']:6.1f} TFLOP/s  x{row['ratio_to_base']:.3f} of base", flush=True)
    out = args.out or RESULTS / (re.sub(r"[^A-Za-z0-9]+", "-", header()["gpu"]).strip("-") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
