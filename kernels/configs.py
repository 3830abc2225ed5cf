"""Every tile choice of the kernels and the planner's thresholds, in one place.

One function per kernel returns its launch configuration (block sizes, warps, pipeline stages) for a
shape. Each answer comes from, in order:
1. the table of the GPU the tensors are on: configs/<GPU name>.json beside this file (spaces as
   underscores, e.g. configs/NVIDIA_H200.json), written by `python benchmarks/tune.py` on that GPU.
   Entries are keyed by kernel, then by shape bucket (the row count M rounded up to a power of two);
   an entry overrides the keys it names.
2. the defaults below, per target: "interpreter" (small tiles, so that test shapes keep masked edges
   and several programs) or any GPU. The GPU defaults are what an H200 ran at commit 8bd3736; none of
   them has been tuned by measurement yet.
A GPU without a table, and a compile check on a machine without one, get the defaults. Answers are
cached per shape: at decode sizes the host time of a call matters as much as its kernels'.

The planner's thresholds (fusedlora/plans/planner.py) come from the same table ("planner").
"""
import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch
import triton

TABLES = Path(__file__).resolve().parent / "configs"
INTERPRETER = "interpreter"

# The interpreter's choices: small tiles keep masked edges and several programs in play on small test
# shapes (and 16-row blocks let small multi-adapter batches span several blocks and adapters).
_INTERPRETER = {
    "lora_gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    "lora_gemm_shrink": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    "lora_backward": dict(BLOCK_N=32, BLOCK_K=32, RANK_CAP=64, num_warps=4, num_stages=1),
    "lora_expand": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1),
    "lora_shrink": dict(BLOCK_M=32, BLOCK_C=32, RANK_CAP=128, num_warps=4, num_stages=1),
    "lora_dy": dict(BLOCK_M=32, BLOCK_N=32, RANK_CAP=64, num_warps=4, num_stages=1),
    "multi_shrink": dict(BLOCK_M=16, BLOCK_C=32, RANK_CAP=128, num_warps=4),
    "multi_gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, RANK_CAP=64, num_warps=4, num_stages=1),
    "multi_reduce": dict(BLOCK_A=32, BLOCK_T=16, RANK_CAP=64, num_warps=4),
    "decode_shrink": dict(BLOCK_C=32, PROGRAMS_PER_SM=2, RANK_CAP=64, num_warps=4),
    "decode_gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, RANK_CAP=64, num_warps=4, num_stages=1),
    "keep_mask": dict(BLOCK_M=32, BLOCK_K=32),
    "dora_norm": dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1),
    # MoE: 16-row tiles so that a few pairs per expert still make several tiles, and an 8-segment search
    # chunk so that test groupings of more segments take the schedule's loop more than once (a chunk's
    # prefix sum costs ~30 ms in the interpreter).
    "moe_gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SEGMENT_CHUNK=8, RANK_CAP=64, num_warps=4,
                     num_stages=1),
    "moe_decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SEGMENT_CHUNK=8, RANK_CAP=64, num_warps=4,
                       num_stages=1),
    "moe_shrink": dict(BLOCK_M=16, BLOCK_C=32, SEGMENT_CHUNK=8, RANK_CAP=64, num_warps=4, num_stages=1),
    "moe_reduce": dict(BLOCK_A=32, BLOCK_B=32, BLOCK_T=16, num_warps=4, num_stages=1),
}

# Planner thresholds, for every target without its own.
# split_from_m: rows from which the single-adapter split plan serves a call, per direction. An H200 ran
# the fused plan at 1.2-1.3x cuBLAS at M = 16 and the split plan at 1.13x at M = 2048 and 8192; the
# crossover in between is unmeasured (benchmarks/tune.py measures it), so it sits at the top of the
# decode range, where the base GEMM is still bound by reading W.
# multi_decode_max_m: rows up to which the multi-adapter split plan runs the decode kernels; the decode
# kernels hold every id of the batch in one block, so it is also their limit (decode_max_rows).
# one_launch_max_m: rows up to which the single-adapter fused plan runs its forward as one launch (the
# shrink inside the GEMM's K loop, every column block recomputing S): there the recomputation (reading
# A, r×K, once per column block from L2) should cost less than a second launch, whose host time alone
# (~20 µs measured by benchmarks/host.py on CPU) exceeds the GEMM's ~8 µs at K = N = 4096 on an H200.
# Untimed on a GPU.
# moe_decode_max_pairs: (token, expert) pairs up to which a MoE projection runs the decode plan (one
# program per segment and column block, no tile search): 16 decode tokens at top-8 are 128 pairs, about
# one per expert of 128; at 256 pairs an expert averages 2 (E = 128) to 32 (E = 8) rows, a 16-row
# tile or two. moe_split_from_pairs: pairs from which the split plan (the library grouped GEMM) serves,
# per direction; between the two the fused plan. Untimed: the dense split plan's library GEMM beat the
# Triton GEMM (1.13x against 1.45x cuBLAS at M = 2048 and 8192 on the H200), so split starts where
# decode ends until benchmarks/tune.py measures the MoE crossover.
# moe_one_launch_max_pairs: pairs up to which the fused plan computes S (dU) in the grouped GEMM's K loop,
# every column block recomputing it (one launch a direction), as one_launch_max_m for dense layers; above,
# the shrink is a launch of its own. Compiled for sm_90 at the large tiles (128x128x64, 8 warps) the
# in-loop shrink spilled 8 to 352 bytes a thread (the dropout mask and tf32x3 operands beside the
# accumulator; triton 3.9, tests/gpu_compile.py); the two launches compile without.
PLANNER = {"split_from_m": {"forward": 65, "backward": 65}, "multi_decode_max_m": 64, "one_launch_max_m": 64,
           "moe_decode_max_pairs": 256, "moe_split_from_pairs": {"forward": 257, "backward": 257},
           "moe_one_launch_max_pairs": 256}
DECODE_MAX_ROWS = 64
# The largest rank the one-launch forward holds in one rank block (rank_block's default cap).
SHRINK_MAX_R = 64


def bucket(M: int) -> int:
    """The shape bucket of M rows: M rounded up to a power of two."""
    return 1 << max(M - 1, 0).bit_length()


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def target(device=None) -> str:
    """"interpreter", the CUDA device's name, or "" (a GPU compile without one: the defaults)."""
    if triton.knobs.runtime.interpret:
        return INTERPRETER
    if device is None or torch.device(device).type != "cuda":
        return ""
    index = torch.device(device).index
    return _device_name(index if index is not None else torch.cuda.current_device())


def table_path(name: str) -> Path:
    return TABLES / (name.replace(" ", "_").replace("/", "_") + ".json")


@functools.lru_cache(maxsize=16)
def table(name: str) -> dict:
    """The tuned table of a target ({} when it has none)."""
    path = table_path(name) if name and name != INTERPRETER else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def _choose(kernel: str, name: str, M: int, default: dict) -> dict:
    base = _INTERPRETER[kernel] if name == INTERPRETER else default
    tuned = table(name).get("kernels", {}).get(kernel, {}).get(str(bucket(M)), {})
    return {**base, **tuned}


def _with_rank(cfg: dict, R: int) -> dict:
    """cfg with BLOCK_R for rank R (from its RANK_CAP) in place of the cap."""
    cfg = dict(cfg)
    cfg["BLOCK_R"] = rank_block(R, cfg.pop("RANK_CAP"))
    return cfg


@functools.lru_cache(maxsize=None)
def rank_block(r: int, cap: int = 64) -> int:
    """Block over the LoRA rank: a power of two, at least 16 (the GPU's tl.dot minimum), at most cap;
    ranks above cap loop over rank blocks."""
    return min(max(16, triton.next_power_of_2(r)), cap)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100/H200's 132 for anything else (compiling
    GPU variants on a machine without one)."""
    if device is None or torch.device(device).type != "cuda":
        return 132
    index = torch.device(device).index
    return _sm_count(index if index is not None else torch.cuda.current_device())


# ---- one function per kernel -------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def lora_gemm(M: int, N: int = 0, device=None) -> dict:
    """The LoRA GEMM (kernels/lora_gemm.py, base product included).

    At decode sizes the GEMM is bound by reading W, and the only lever is to have every SM stream a
    share of it: 64x64 tiles gave 64 programs for N = 4096 on a 132-SM H200, so small M narrows the
    column block until there are two programs per SM."""
    if M <= 64:
        block_m = max(16, triton.next_power_of_2(M))
        block_n = 64
        while N and block_n > 16 and -(-M // block_m) * -(-N // block_n) < 2 * sm_count(device):
            block_n //= 2
        default = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        default = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return _choose("lora_gemm", target(device), M, default)


@functools.lru_cache(maxsize=4096)
def lora_gemm_shrink(M: int, N: int = 0, device=None) -> dict:
    """The one-launch decode forward (the LoRA GEMM with the shrink in its K loop, M <= 64): the GEMM's
    decode tiles with half its reduction block, since the shrink's accumulator and the dropout mask
    tile live beside the base product's (compiled for sm_90 at BLOCK_K = 128 the bf16 variant with
    dropout spilled 16 B; triton 3.9, tests/gpu_compile.py)."""
    default = dict(lora_gemm(M, N, device), BLOCK_K=64)
    return _choose("lora_gemm_shrink", target(device), M, default)


@functools.lru_cache(maxsize=4096)
def lora_backward(M: int, K: int, R: int, device=None) -> dict:
    """The one-launch backward (M <= 64: one row block, its size set from M by the launcher): the
    one-launch forward's column and reduction blocks for dX's K columns, bound by reading W as that
    kernel is. Compiled for sm_90 with fp32 adapters it takes 242-248 registers a thread without
    spilling; 8 warps spilled up to 56 B (triton 3.9)."""
    tiles = lora_gemm_shrink(M, K, device)
    default = dict(BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], RANK_CAP=SHRINK_MAX_R,
                   num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return _with_rank(_choose("lora_backward", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def lora_expand(M: int, device=None) -> dict:
    """The low-rank term alone (out = addend + p·qᵀ): a memory-bound pass over the M×N output whose
    reduction is the rank, so wide tiles and no deep pipeline."""
    default = dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    return _choose("lora_expand", target(device), M, default)


@functools.lru_cache(maxsize=4096)
def dora_norm(N: int, K: int, R: int, device=None) -> dict:
    """DoRA's row norms (kernels/dora_norm.py): one pass over W, bound by reading it, so the row block
    narrows until every SM has about two programs streaming a share of W (BLOCK_N = 16 gives 256
    programs at N = 4096). The rank block holds every rank (r <= 64): W·Aᵀ and A·Aᵀ accumulate whole."""
    block_n = 32
    while block_n > 16 and -(-N // block_n) < 2 * sm_count(device):
        block_n //= 2
    default = dict(BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(_choose("dora_norm", target(device), N, default), BLOCK_R=rank_block(R))


# wide: a dot with an fp32 operand (tf32x3 or ieee), whose operand tiles take three times the
# registers of a half-precision one: compiled for sm_90 at the half-precision tiles, the shrink, dU/dB and
# decode kernels spilled (8 to 520 bytes of local memory per thread, cuobjdump on the cubin, triton 3.9),
# so wide dots get half the reduction block or twice the warps.

@functools.lru_cache(maxsize=4096)
def lora_shrink(M: int, R: int, device=None, wide: bool = False) -> dict:
    """S = x·Aᵀ and dAᵀ: one program streams BLOCK_M rows over all of C (at M <= 16 a single program)."""
    default = dict(BLOCK_M=64 if M > 64 else 16, BLOCK_C=64 if wide else 128, RANK_CAP=128,
                   num_warps=8 if wide else 4, num_stages=3)
    return _with_rank(_choose("lora_shrink", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def lora_dy(M: int, R: int, device=None, wide: bool = False) -> dict:
    """dU and dB from one pass over dY."""
    default = dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, RANK_CAP=64, num_warps=4, num_stages=3)
    return _with_rank(_choose("lora_dy", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def multi_shrink(M: int, R: int, device=None, wide: bool = False) -> dict:
    default = dict(BLOCK_M=16 if M <= 64 else 64, BLOCK_C=64 if wide else 128, RANK_CAP=128,
                   num_warps=8 if wide or M > 64 else 4)
    return _with_rank(_choose("multi_shrink", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def multi_gemm(M: int, N: int, R: int, has_base: bool, device=None) -> dict:
    """With the base product, the LoRA GEMM's tiles; without it (the split plan's low-rank term) a
    memory-bound pass over the output: the single-adapter expand's, with twice the warps (its fp32
    low-rank dots spilled at 4 warps, tile 64x128)."""
    default = {**(lora_gemm(M, N, device) if has_base else dict(lora_expand(M, device), num_warps=8)), "RANK_CAP": 64}
    return _with_rank(_choose("multi_gemm", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def multi_reduce(M: int, R: int, device=None) -> dict:
    default = dict(BLOCK_A=64, BLOCK_T=64, RANK_CAP=64, num_warps=4)
    return _with_rank(_choose("multi_reduce", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def decode_shrink(M: int, R: int, device=None, wide: bool = False) -> dict:
    """PROGRAMS_PER_SM: how many programs per SM the split over C aims for."""
    default = dict(BLOCK_C=64 if wide else 128, PROGRAMS_PER_SM=2, RANK_CAP=64, num_warps=4)
    return _with_rank(_choose("decode_shrink", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def decode_gemm(M: int, N: int, R: int, device=None) -> dict:
    """The decode GEMM (base product, then each adapter's expand over its rows): the one-launch
    forward's tiles (the LoRA GEMM's decode tiles at half its reduction block), bound by reading W as
    those kernels are. At the full block the bf16 variant that writes S spilled 16 B for sm_90, at 3
    or 4 stages (triton 3.9, tests/gpu_compile.py)."""
    tiles = lora_gemm_shrink(M, N, device)
    default = dict(BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], RANK_CAP=64,
                   num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return _with_rank(_choose("decode_gemm", target(device), M, default), R)


# ---- MoE (kernels/moe_lora.py, kernels/moe_reduce.py) -------------------------------------------
# SEGMENT_CHUNK: segments the tile search reads per step (the search loops over E·(L+1) / SEGMENT_CHUNK
# steps); RANK_CAP: the rank block of a low-rank term read from memory (larger ranks loop). None of the
# GPU defaults is measured: they follow the dense kernels' (an H200 at commit 8bd3736) and
# benchmarks/tune.py's MoE rows measure them.

@functools.lru_cache(maxsize=4096)
def moe_gemm(M: int, N: int, groups: int, shrink: bool, device=None, wide: bool = False, has_base: bool = True) -> dict:
    """The grouped GEMM over M sorted pairs in `groups` segments (fused and split plans). Tiles never
    span two experts, so a segment wastes up to BLOCK_M - 1 rows: the row block follows the mean rows
    per segment (256 at Qwen3-30B-A3B's 4096 tokens, top-8 of 128 experts). With the shrink in the K
    loop the reduction block is halved, as the dense one-launch forward's (lora_gemm_shrink), and halved
    again for a wide (fp32-operand) shrink."""
    mean = M / max(groups, 1)
    if mean >= 192:
        # 32-deep reduction steps, 4 stages: at the dense GEMM's 64 and 3 the base product with the expand
        # (fp32 tf32x3 operands) spilled 8 to 64 bytes a thread for sm_90 with triton 3.6 (8 with 3.9); at
        # 32 and 4 none did with 3.9, one variant 16 bytes with 3.6 (tests/gpu_compile.py).
        default = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4)
    elif mean >= 48:
        default = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:  # the decode schedule's tiles (moe_decode says why)
        default = dict(BLOCK_M=16 if mean <= 16 else 32, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4,
                       num_stages=2 if wide else 3)
    if shrink:
        default["BLOCK_K"] = min(default["BLOCK_K"], 32 if wide else 64)
    if not has_base:
        # The split plan's expand onto the library GEMM's output: a memory-bound pass whose reduction is
        # the rank, as the multi-adapter expand (fp32 low-rank dots: 8 warps). At 128x128 tiles its masked
        # dX variant spilled 40 bytes a thread for sm_90 (gpt-oss-20b's sizes, triton 3.9).
        default = dict(default, BLOCK_M=min(default["BLOCK_M"], 64), BLOCK_N=128, num_warps=8, num_stages=2)
    default.update(SEGMENT_CHUNK=1024, RANK_CAP=64)
    return _choose("moe_gemm", target(device), M, default)


@functools.lru_cache(maxsize=4096)
def moe_decode(M: int, N: int, device=None, wide: bool = False) -> dict:
    """The decode schedule (a program per segment and column block, looping over its rows): bound by
    reading the active experts' W, as the dense decode GEMM. At 16 tokens of top-8 over 128 experts
    about 80 experts hold a pair, so 32-column blocks make ~80·N/32 programs, many per SM. Compiled for
    sm_90, 64-column blocks at 4 stages spilled 8 to 120 bytes a thread with the shrink in the K loop,
    and 32-column ones 16 to 72 bytes with a wide (fp32-adapter, tf32x3) shrink at BLOCK_K = 64
    (triton 3.9, tests/gpu_compile.py): a wide shrink gets half the reduction block, and two stages (at
    three, one variant or another took an 8-byte stack frame, on triton 3.9 and 3.6 alike)."""
    default = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32 if wide else 64, GROUP_M=1, SEGMENT_CHUNK=1024, RANK_CAP=64,
                   num_warps=4, num_stages=2 if wide else 3)
    return _choose("moe_decode", target(device), M, default)


@functools.lru_cache(maxsize=4096)
def moe_shrink(M: int, R: int, device=None, wide: bool = False) -> dict:
    """U = c·D(X)·Qᵀ per segment tile (the split plan's S and dU): the dense shrink's tiles."""
    default = dict(BLOCK_M=64 if M > 64 else 16, BLOCK_C=64 if wide else 128, SEGMENT_CHUNK=1024, RANK_CAP=64,
                   num_warps=8 if wide else 4, num_stages=3)
    return _with_rank(_choose("moe_shrink", target(device), M, default), R)


@functools.lru_cache(maxsize=4096)
def moe_reduce(M: int, device=None) -> dict:
    """dA, dB, dW and db per segment: the multi-adapter reduction's tiles (the launcher narrows a block
    to its dimension, at least 16)."""
    default = dict(BLOCK_A=64, BLOCK_B=64, BLOCK_T=64, num_warps=4, num_stages=3)
    return _choose("moe_reduce", target(device), M, default)


def keep_mask(device=None) -> dict:
    """The materialized dropout mask (tests and debugging only)."""
    return _choose("keep_mask", target(device), 1, dict(BLOCK_M=32, BLOCK_K=32))


# ---- the planner's thresholds ------------------------------------------------------------------

def _current_target() -> str:
    # Only a CUDA context already made is asked its device: importing fusedlora must not create one.
    if triton.knobs.runtime.interpret or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    return target(torch.device("cuda", torch.cuda.current_device()))


def planner_value(key: str):
    """A planner threshold: the current GPU's table, else the default."""
    return table(_current_target()).get("planner", {}).get(key, PLANNER[key])


class SplitFromM(Mapping):
    """{direction: rows from which the split plan serves}, read when first asked (after the GPU is
    known), then fixed."""

    @functools.cached_property
    def _values(self):
        return dict(planner_value("split_from_m"))

    def __getitem__(self, direction):
        return self._values[direction]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


# Functions clear_caches also calls: the per-shape caches of the callers (fusedlora/ops) that keep
# configurations computed from these answers.
CLEAR_HOOKS = []


def clear_caches(tables: bool = True):
    """Forget every cached answer: after a table file is written (tables=True), or after an entry of a
    loaded table is changed in memory (tables=False, as benchmarks/tune.py does for each candidate)."""
    for hook in CLEAR_HOOKS:
        hook()
    for fn in (lora_gemm, lora_gemm_shrink, lora_backward, lora_expand, lora_shrink, lora_dy, multi_shrink, multi_gemm,
               multi_reduce, decode_shrink, decode_gemm, dora_norm, moe_gemm, moe_decode, moe_shrink,
               moe_reduce) + ((table,) if tables else ()):
        fn.cache_clear()
