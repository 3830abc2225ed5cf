"""Which execution plan serves a call: the one place that decides, from shapes alone.

Single-adapter plans (lora_linear; fusedlora/plans/single.py):
- "fused": the low-rank term runs inside a Triton GEMM (y = x·Wᵀ + b + S·Bᵀ in one kernel, and dX
  likewise): fewest launches and no extra pass over the output, but the GEMM is Triton's.
- "split": the library GEMM (cuBLAS through torch) computes x·Wᵀ and dY·W; Triton kernels compute
  the low-rank term and the library GEMM accumulates onto it (beta = 1), so the output is written
  by the fastest GEMM at the cost of one extra pass over it.

- "decode" names the multi-adapter decode plan (below); for the single-adapter op it means "fused",
  the plan auto takes at decode sizes, at every M. So every value of FUSEDLORA_PLAN
  (fusedlora/core/knobs.py: auto, fused, split, decode) serves every call, and the tests run each.
lora_add has one plan of its own (the split plan's expand onto a base someone else computed).

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

from fusedlora.core import knobs
from fusedlora.kernels import configs

PLANS = ("fused", "split", "decode")

# Rows (M = prod(x.shape[:-1])) from which the split plan serves a call, per direction: the GPU's
# tuned table, else the default (fusedlora/kernels/configs.py).
SPLIT_FROM_M = configs.SplitFromM()


def choose(direction: str, M: int, K: int, N: int, r: int) -> str:
    """"fused" or "split" for a single-adapter call: direction "forward" or "backward", x: (M, K),
    weight: (N, K), rank r. Depends on shapes only (never on values), so torch.compile and CUDA graphs
    see one choice per shape; dropout and dtype do not change the rule (no measurement says they
    should). Today's rule reads M alone; the rest of the shape is the interface a measured crossover
    would need."""
    forced = knobs.plan()
    if forced == "auto":
        return "split" if M >= SPLIT_FROM_M[direction] else "fused"
    return "fused" if forced == "decode" else forced


# ---- multi-adapter (fusedlora.multi_lora_linear) -----------------------------------------------
# Plans (fusedlora/plans/multi.py):
# - "fused": tokens grouped by adapter, each adapter's expand inside the Triton GEMM.
# - "split": the library GEMM computes x·Wᵀ (dY·W) for all rows at once and accumulates onto the
#   low-rank term that Triton kernels wrote first over tokens grouped by adapter (segment kernels),
#   each row with its own adapter at its own rank.
# - "decode": the decode kernels (kernels/multi_decode.py: per-row adapter lookup, no sort), which serve
#   1 to MULTI_DECODE_MAX_M rows in two launches: the shrink split over K, then a Triton GEMM that adds
#   b and each row's low-rank term to x·Wᵀ before its one write of y. It is the single-adapter fused
#   plan's trade at decode sizes (a Triton GEMM at 1.19x cuBLAS on the H200 at M = 16, against a third
#   launch and an extra pass over y); untimed on a GPU. Forced where the decode kernels cannot serve
#   (M = 0 or above the bound), it runs the split plan.
#
# What an H200 measured (bf16, 64 adapters, r = 16, K = N = 4096; ratio to cuBLAS's x·Wᵀ): at
# M = 4096 the fused kernel ran 2.65x and cuBLAS plus the same shrink and expand kernels 2.17x; at
# M = 64, 34.5x and 33.3x. The fused GEMM alone took 341 µs against cuBLAS's 193 µs at M = 4096, and
# 62 µs against 8 µs at M = 64, where it walks up to 64 adapter segments per row block. No shape has
# measured the fused plan faster, so auto never takes it; it stays for FUSEDLORA_PLAN=fused and the
# benchmark. Auto takes decode wherever the decode kernels can serve the call: that bound is their
# design limit (one program block holds every id of the batch), not a measured crossover.
# The value comes from the GPU's table or the default (fusedlora/kernels/configs.py), which never
# exceeds the decode kernels' own row limit.
MULTI_DECODE_MAX_M = configs.planner_value("multi_decode_max_m")


def choose_multi(direction: str, M: int, K: int, N: int, R: int, L: int) -> str:
    """"fused", "split" or "decode" for a multi-adapter call: direction "forward" or "backward", x: (M, K),
    weight: (N, K), L adapters stacked to rank R. Shapes only, never the ids, so torch.compile and CUDA
    graphs see one choice per shape."""
    forced = knobs.plan()
    decode = 0 < M <= MULTI_DECODE_MAX_M
    if forced == "auto" or forced == "decode":
        return "decode" if decode else "split"
    return forced


# ---- LoRA on MoE experts (fusedlora/plans/moe.py) ----------------------------------------------
# Plans over the P = T·k (token, expert) pairs of a projection:
# - "decode": the fused kernels on the decode schedule (a program per segment and column block, no
#   tile search, programs of experts without a pair exit at once): few pairs, each expert a tile or
#   two, the GEMM bound by reading the active experts' weights. Up to MOE_DECODE_MAX_PAIRS.
# - "fused": the Triton grouped GEMM with the shrink in its K loop and the expand in its epilogue.
# - "split": the library grouped GEMM for X·W_eᵀ (dY·W_e) plus the Triton shrink and an expand that
#   adds onto its output. From MOE_SPLIT_FROM_PAIRS (per direction).
# What they rest on: nothing MoE has been timed on a GPU. The dense plans' measurements (H200, bf16,
# K = N = 4096, r = 16) put the Triton GEMM at 1.45x cuBLAS at M = 8192 and 1.46x at M = 2048, and
# cuBLAS plus separately launched low-rank work at 1.13x; a grouped GEMM at 4096 tokens (top-8 of 128
# experts: 256 rows per expert) is in that regime, so split takes over where decode ends. Every value
# of FUSEDLORA_PLAN serves every call: "decode" serves any P (its programs loop over their segment's
# rows), "split" runs the fused plan's product where the library grouped GEMM cannot serve the operands.


@functools.lru_cache(maxsize=1)
def moe_thresholds() -> tuple:
    """(MOE_DECODE_MAX_PAIRS, MOE_SPLIT_FROM_PAIRS): the GPU's table or the defaults
    (fusedlora/kernels/configs.py), read when first asked, after the GPU is known."""
    return configs.planner_value("moe_decode_max_pairs"), dict(configs.planner_value("moe_split_from_pairs"))


def choose_moe(direction: str, P: int, K: int, N: int, R: int, E: int, L: int) -> str:
    """"decode", "fused" or "split" for one projection of a MoE layer with LoRA on its experts: direction
    "forward" or "backward", P (token, expert) pairs, x rows of K, weight: (E, N, K), L adapters stacked to
    rank R. Shapes only, never the routing, so torch.compile and CUDA graphs see one choice per shape."""
    forced = knobs.plan()
    if forced != "auto":
        return forced
    decode_max, split_from = moe_thresholds()
    if P <= decode_max:
        return "decode"
    return "split" if P >= split_from[direction] else "fused"


configs.CLEAR_HOOKS.append(moe_thresholds.cache_clear)
