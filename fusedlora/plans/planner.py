"""Which execution plan serves a call: the one place that decides, from shapes alone.

Plans (fusedlora/plans/single.py):
- "fused": the low-rank term runs inside a Triton GEMM (y = x·Wᵀ + b + S·Bᵀ in one kernel, and dX
  likewise): fewest launches and no extra pass over the output, but the GEMM is Triton's.
- "split": the library GEMM (cuBLAS through torch) computes x·Wᵀ and dY·W; Triton kernels compute
  the low-rank term and the library GEMM accumulates onto it (beta = 1), so the output is written
  by the fastest GEMM at the cost of one extra pass over it.

FUSEDLORA_PLAN = auto (default) | fused | split forces one for every call (tests run both).

The rules come from an H200 (bf16, K = N = 4096, r = 16; ratios to cuBLAS's x·Wᵀ in the same run):
- the Triton GEMM under the fused plan ran 1.45x cuBLAS at M = 8192, 1.46x at M = 2048 and 1.19x
  at M = 16, so no fusion can win once the GEMM is compute-bound;
- cuBLAS plus the low-rank term added by separate launches cost 1.13x at M = 2048 and 8192, but
  1.92x at M = 16 (graph-timed), where the launches and the extra pass over a tiny output dominate
  and the fused plan ran 1.2-1.3x.
So small row counts take the fused plan and everything else the split plan. The crossover between
M = 16 and M = 2048 has not been measured (`python benchmarks/run.py --plans` on a GPU measures it);
SPLIT_FROM_M sits at the top of the decode range, where the base GEMM is still bound by reading W.
"""
import functools
import os

from fusedlora.kernels import configs

PLANS = ("fused", "split")
CHOICES = ("auto",) + PLANS

# Rows (M = prod(x.shape[:-1])) from which the split plan serves a call, per direction: the GPU's
# tuned table, else the default (fusedlora/kernels/configs.py).
SPLIT_FROM_M = configs.SplitFromM()


def forced_plan() -> str:
    """FUSEDLORA_PLAN, read on every call so that tests and users can switch it at run time."""
    return _parse(os.environ.get("FUSEDLORA_PLAN"))


@functools.lru_cache(maxsize=16)
def _parse(value) -> str:
    choice = (value or "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"FUSEDLORA_PLAN must be one of {CHOICES}, got {choice!r}")
    return choice


@functools.lru_cache(maxsize=4096)
def _rule(direction: str, M: int, K: int, N: int, r: int) -> str:
    return "split" if M >= SPLIT_FROM_M[direction] else "fused"


def choose(direction: str, M: int, K: int, N: int, r: int) -> str:
    """"fused" or "split" for a single-adapter call: direction "forward" or "backward", x: (M, K),
    weight: (N, K), rank r. Depends on shapes only (never on values), so torch.compile and CUDA graphs
    see one choice per shape; dropout and dtype do not change the rule (no measurement says they
    should)."""
    forced = _parse(os.environ.get("FUSEDLORA_PLAN"))
    return _rule(direction, M, K, N, r) if forced == "auto" else forced

# ---- multi-adapter (fusedlora.multi_lora_linear) -----------------------------------------------
# Plans (fusedlora/plans/multi.py), the same two as above:
# - "fused": tokens grouped by adapter, each adapter's expand inside the Triton GEMM.
# - "split": the library GEMM computes x·Wᵀ (dY·W) for all rows at once and accumulates onto the
#   low-rank term that Triton kernels wrote first, each row with its own adapter at its own rank.
#   Up to MULTI_DECODE_MAX_M rows the split plan runs the decode kernels (kernels/multi_decode.py:
#   per-row adapter lookup, no sort); above, segment kernels over tokens grouped by adapter.
#
# What an H200 measured (bf16, 64 adapters, r = 16, K = N = 4096; ratio to cuBLAS's x·Wᵀ): at
# M = 4096 the fused kernel ran 2.65x and cuBLAS plus the same shrink and expand kernels 2.17x; at
# M = 64, 34.5x and 33.3x. The fused GEMM alone took 341 µs against cuBLAS's 193 µs at M = 4096, and
# 62 µs against 8 µs at M = 64, where it walks up to 64 adapter segments per row block. No shape has
# measured the fused plan faster, so auto takes the split plan everywhere; the fused plan stays for
# FUSEDLORA_PLAN=fused and the benchmark. The decode bound is the decode kernels' design limit (one
# program block holds every id of the batch), not a measured crossover.
MULTI_DECODE_MAX_M = configs.planner_value("multi_decode_max_m")


@functools.lru_cache(maxsize=4096)
def _multi_rule(direction: str, M: int, K: int, N: int, R: int, L: int) -> str:
    return "split"


def choose_multi(direction: str, M: int, K: int, N: int, R: int, L: int) -> str:
    """"fused" or "split" for a multi-adapter call: direction "forward" or "backward", x: (M, K),
    weight: (N, K), L adapters stacked to rank R. Shapes only, never the ids, so torch.compile and CUDA
    graphs see one choice per shape."""
    forced = _parse(os.environ.get("FUSEDLORA_PLAN"))
    return _multi_rule(direction, M, K, N, R, L) if forced == "auto" else forced


def multi_decode(plan: str, M: int) -> bool:
    """Whether the split plan runs the decode kernels for M rows (the fused plan never does)."""
    return plan == "split" and 0 < M <= MULTI_DECODE_MAX_M
