"""Compile every kernel variant the launchers pick at real sizes, for an H100/H200 (sm_90), without a GPU.

The interpreter hides what only the GPU compiler refuses or does badly (dot shapes, types, shared
memory, register spills, no tensor-core instructions). Triton ships ptxas, so the real compile runs on
CPU. This script calls the public API at real sizes on the meta device (shapes only: nothing is
computed), records each launch instead of running it, binds its arguments with Triton's own binder
for an sm_90 target (pointer alignment, divisibility by 16, integers equal to 1, i32/i64: the
variant the GPU would build, tests/sm90.py), and compiles every distinct variant. Per variant it
prints shared memory, registers, spilled bytes and whether the PTX uses wgmma. It fails on a compile
error, on shared memory over the H100/H200 limit, on spill traffic in a hot loop of a kernel the
default plans run, and on a GEMM with the base product at M >= 2048 that does not use wgmma. Spilled
bytes are the local memory (stack frame) cuobjdump reports for the cubin; a spill is hot when one of
its local loads or stores (SASS LDL/STL) lies in an innermost loop, the loop that runs once per K (or
C, T) step. A spill outside them runs a few times per program: triton 3.8 leaves 1-9 such loads and
stores (8-16 B) in five default variants, each one per program or one per rank chunk, where 3.6, 3.7
and 3.9 leave none; they are printed, not failed.

Sizes: K = N = 4096 and 4096 -> 14336; M = 1, 16, 64, 65, 2048, 8192; bf16 x with bf16 and fp32 adapters;
dropout on and off; forward and backward; single-adapter, DoRA and 64 adapters; every plan. MoE (the projection's
plans, fusedlora/plans/moe.py): Qwen3-30B-A3B's experts (E = 128, H = 2048, I = 768, top-8, r = 16), gate_up
(2048 -> 1536, x gathered) and down (768 -> 2048, sorted input), 16 and 4096 tokens, adapters contiguous or
PEFT's layout (fp32), and gpt-oss-20b's transposed experts with biases (E = 32, 2880 -> 5760, top-4).

    python tests/gpu_compile.py          every variant (by hand: ~180 variants, 10-25 min on 2 cores)
    python tests/gpu_compile.py --quick  the default plans at K = N = 4096, M = 1, 65, 8192, the fused at 8192,
                                         and MoE's at 16 and 4096 tokens, its fused at 4096
                                         (tests/test_gpu_compile.py runs it); triton 3.6 and 3.9
    python tests/gpu_compile.py [--quick] --moe   the MoE variants alone
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fusedlora  # noqa: E402
import fusedlora.core.backend  # noqa: E402
from fusedlora.kernels.dropout import keep_mask  # noqa: E402
from sm90 import TARGET, record_launches, source  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory a block may use on an H100/H200 (227 KB)
GEMMS = ("_lora_gemm_kernel", "_multi_gemm_kernel", "_moe_gemm_kernel")
META = torch.device("meta")
SHAPES = ((4096, 4096), (4096, 14336))
ROWS = (1, 16, 64, 65, 2048, 8192)
QUICK_ROWS = (1, 65, 8192)  # --quick (the test suite's run): decode, small and large buckets


def single(plan, M, K, N, adapter_dtype, p):
    x = torch.empty(M, K, dtype=torch.bfloat16, device=META, requires_grad=True)
    W = torch.empty(N, K, dtype=torch.bfloat16, device=META)
    A = torch.empty(16, K, dtype=adapter_dtype, device=META, requires_grad=True)
    B = torch.empty(N, 16, dtype=adapter_dtype, device=META, requires_grad=True)
    fusedlora.lora_linear(x, W, None, A, B, 2.0, p, seed=5).sum().backward()
    base = torch.empty(M, N, dtype=torch.bfloat16, device=META, requires_grad=True)
    fusedlora.lora_add(base, x, A, B, 2.0, p, seed=5).sum().backward()
    m = torch.empty(N, dtype=adapter_dtype, device=META, requires_grad=True)
    fusedlora.dora_linear(x, W, None, A, B, m, 2.0, p, seed=5).sum().backward()
    with torch.no_grad():  # eager inference: the call plans' launches (the decode forward writes no S)
        fusedlora.lora_linear(x, W, None, A, B, 2.0, p, seed=5)
        fusedlora.lora_add(base, x, A, B, 2.0, p, seed=5)


def multi(M, K, N, adapter_dtype):
    x = torch.empty(M, K, dtype=torch.bfloat16, device=META, requires_grad=True)
    W = torch.empty(N, K, dtype=torch.bfloat16, device=META)
    A = torch.empty(64, 16, K, dtype=adapter_dtype, device=META, requires_grad=True)
    B = torch.empty(64, N, 16, dtype=adapter_dtype, device=META, requires_grad=True)
    ids = torch.zeros(M, dtype=torch.int64, device=META)
    ranks = torch.full((64,), 16, dtype=torch.int32, device=META)
    fusedlora.multi_lora_linear(x, W, None, A, B, torch.ones(64, device=META), ids, ranks).sum().backward()
    with torch.no_grad():
        fusedlora.multi_lora_linear(x, W, None, A, B, torch.ones(64, device=META), ids, ranks)


def drive(plan, shapes=SHAPES, rows=ROWS):
    """Every call of the public API at the real sizes, under FUSEDLORA_PLAN=plan."""
    os.environ["FUSEDLORA_PLAN"] = plan
    try:
        for K, N in shapes:
            for M in rows:
                for adapter_dtype in (torch.bfloat16, torch.float32):
                    for p in (0.0, 0.1):
                        single(plan, M, K, N, adapter_dtype, p)
                    if (K, N) == SHAPES[0]:
                        multi(M, K, N, adapter_dtype)
    finally:
        del os.environ["FUSEDLORA_PLAN"]


# MoE experts: (name, E, K, N, top-k, gather, transposed weight with biases). Qwen3-30B-A3B's gate_up reads the
# tokens (gather), its down the activation in sorted order; gpt-oss stores (E, K, N) with per-expert biases.
MOE_PROJECTIONS = (("qwen3-gate_up", 128, 2048, 1536, 8, True, False), ("qwen3-down", 128, 768, 2048, 8, False, False),
                   ("gpt-oss-gate_up", 32, 2880, 5760, 4, True, True))
MOE_TOKENS = (16, 4096)


def moe(T, E, K, N, k, gather, transposed, adapters, p):
    """One MoE projection forward and backward (x, lora_A, lora_B) through its plans, rank 16. adapters:
    "bf16" or "fp32" stacked (1, E, r, K) / (1, E, N, r), or "peft": PEFT's fp32 parameters viewed."""
    from fusedlora.core.moe_routing import ExpertRouting
    from fusedlora.plans import moe as plans, planner
    bf16, r, P = torch.bfloat16, 16, T * k
    routing = ExpertRouting(torch.empty(T, k, dtype=torch.int64, device=META), E)
    x = torch.empty(T if gather else P, K, dtype=bf16, device=META)
    W = torch.empty(E, K, N, dtype=bf16, device=META).transpose(1, 2) if transposed else \
        torch.empty(E, N, K, dtype=bf16, device=META)
    bias = torch.empty(E, N, dtype=bf16, device=META) if transposed else None
    if adapters == "peft":
        A = torch.empty(E * r, K, device=META).view(1, E, r, K)
        B = torch.empty(N, E * r, device=META).view(N, r, E).permute(2, 0, 1).unsqueeze(0)
    else:
        dtype = bf16 if adapters == "bf16" else torch.float32
        A, B = torch.empty(1, E, r, K, dtype=dtype, device=META), torch.empty(1, E, N, r, dtype=dtype, device=META)
    out = torch.empty(P, N, dtype=bf16, device=META)
    S = plans.forward(planner.choose_moe("forward", P, K, N, r, E, 1), x, routing, W, bias, A, B, 2.0, None, p, 5,
                      gather, out, True)
    plans.backward(planner.choose_moe("backward", P, K, N, r, E, 1), torch.empty(P, N, dtype=bf16, device=META), x,
                   routing, W, A, B, 2.0, None, S, p, 5, gather, (True, False, False, True, True))


def drive_moe(plan, tokens=MOE_TOKENS, projections=MOE_PROJECTIONS, adapters=("bf16", "fp32", "peft")):
    """The MoE projections at real sizes under FUSEDLORA_PLAN=plan, dropout off and on."""
    os.environ["FUSEDLORA_PLAN"] = plan
    try:
        for _, E, K, N, k, gather, transposed in projections:
            for T in tokens:
                for kind in adapters:
                    for p in (0.0, 0.1):
                        moe(T, E, K, N, k, gather, transposed, kind, p)
    finally:
        del os.environ["FUSEDLORA_PLAN"]


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory per thread (spilled registers: ptxas's stack frame) of a compiled
    kernel, from cuobjdump -res-usage on its cubin (Triton ships cuobjdump with ptxas), and its spill
    instructions in innermost loops (hot_spills), from cuobjdump -sass."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return dict(registers=int(usage.get("REG", -1)), spills=max(int(usage.get("STACK", 0)), int(usage.get("LOCAL", 0))),
                hot_spills=hot_spills(sass))


def hot_spills(sass: str) -> int:
    """How many local loads and stores (LDL/STL: ptxas's spills) of a SASS listing lie inside an innermost
    loop. A branch back to an earlier address closes a loop from its target to the branch; a loop is
    innermost when no other such range lies within it. Triton lowers its `range` loops this way and
    unrolls `static_range`, so the innermost loops are the K (C, T) loops whose body runs per tile step."""
    code = [(int(address, 16), text) for address, text in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = set()
    for address, text in code:
        target = re.search(r"\bBRA(?:\.\w+)*\s.*?\b0x([0-9a-f]+)\s*$", text)
        if target and int(target.group(1), 16) <= address:
            loops.add((int(target.group(1), 16), address))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    return sum(1 for address, text in code if re.search(r"\b(?:LDL|STL)\b", text)
               and any(s <= address <= e for s, e in innermost))


@triton.jit
def _accumulate(x_ptr, out_ptr, K, BLOCK: tl.constexpr):
    """A BLOCK x BLOCK fp32 tile summed over K steps: with one warp, BLOCK² / 32 accumulator values a
    thread stay live across the loop, so a register cap below that spills inside it."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K):
        acc += tl.load(x_ptr + k * BLOCK * BLOCK + tile)
    tl.store(out_ptr + tile, acc)


def spill_check_sees() -> str:
    """What is wrong with the spill check under this Triton, or "": _accumulate held to 64 registers a
    thread (128 accumulator values) must show hot spills, and uncapped no spill at all. Run first, so
    that a listing format hot_spills no longer parses cannot pass every variant unseen."""
    usage = {}
    for cap in (64, None):
        src, options, _ = source(_accumulate, (torch.empty(4 * 64 * 64, device=META),
                                               torch.empty(64 * 64, device=META), 4),
                                 dict(BLOCK=64, num_warps=1, **({"maxnreg": cap} if cap else {})))
        usage[cap] = resource_usage(triton.compile(src, target=TARGET, options=options).asm["cubin"])
    if not (usage[64]["spills"] and usage[64]["hot_spills"]):
        return f"a kernel capped at 64 registers shows no hot spill: {usage[64]}"
    if usage[None]["spills"] or usage[None]["hot_spills"]:
        return f"the uncapped kernel spills: {usage[None]}"
    return ""


def variants(quick=False, moe_only=False):
    """[(kernel name, src, options, bound args, in a default plan)], one per distinct variant, over every
    plan; quick: the default plans at K = N = 4096 and M = 1, 65, 8192, and the fused plan at M = 8192; MoE's
    default plans at Qwen3-30B-A3B's sizes (16 and 4096 tokens) and its fused plan at 4096; moe_only: MoE's
    variants alone."""
    seen = {}
    fusedlora.core.backend.interpreting = lambda: True  # let FUSEDLORA_BACKEND=triton through off CUDA
    os.environ["FUSEDLORA_BACKEND"] = "triton"
    # quick: the default plans, and the fused plan at M = 8192 (a GEMM that must use wgmma).
    runs = ((("auto", dict(shapes=SHAPES[:1], rows=QUICK_ROWS)), ("fused", dict(shapes=SHAPES[:1], rows=(8192,))))
            if quick else tuple((plan, {}) for plan in ("auto", "fused", "split", "decode")))
    qwen3 = MOE_PROJECTIONS[:2]
    moe_runs = ((("auto", dict(projections=qwen3)), ("fused", dict(tokens=(4096,), projections=qwen3)))
                if quick else tuple((plan, {}) for plan in ("auto", "fused", "split", "decode")))
    drives = [] if moe_only else [(plan, lambda plan=plan, sizes=sizes: drive(plan, **sizes)) for plan, sizes in runs]
    drives += [(plan, lambda plan=plan, sizes=sizes: drive_moe(plan, **sizes)) for plan, sizes in moe_runs]
    for plan, run in drives:
        launches = record_launches(run)
        if plan == "auto" and not moe_only:
            launches += record_launches(lambda: keep_mask(7, 64, 64, 1 << 20, META))
        for kernel, args, kwargs in launches:
            src, options, bound = source(kernel, args, kwargs)
            key = (kernel.fn.__name__, src.hash(), repr(sorted(options.items())))
            if key not in seen:
                seen[key] = (kernel.fn.__name__, src, options, bound, plan == "auto")
    return list(seen.values())


def main(argv):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", \
        "run without TRITON_INTERPRET: it records launches of compiled kernels for the GPU"
    failed = []
    blind = spill_check_sees()
    print(f"FAIL  the spill check: {blind}" if blind else "ok    the spill check sees a spill in a K loop", flush=True)
    if blind:
        return 1
    found = list(variants(quick="--quick" in argv, moe_only="--moe" in argv))
    print(f"{len(found)} distinct kernel variants at real sizes; compiling each for sm_90", flush=True)
    for name, src, options, bound, default in found:
        flags = " ".join(f"{k}={v}" for k, v in bound.items() if k.isupper() and len(k) > 1 and k != "DOT_DTYPE")
        label = f"{name} M={bound.get('M')} {flags} warps={options['num_warps']} stages={options['num_stages']}"
        try:
            compiled = triton.compile(src, target=TARGET, options=options)
        except Exception as exc:  # report every failing variant, not only the first
            failed.append(label)
            print(f"FAIL  {label}\n      {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        report = resource_usage(compiled.asm["cubin"])
        wgmma = "wgmma" in compiled.asm["ptx"]
        problems = []
        if compiled.metadata.shared > SHARED_LIMIT:
            problems.append(f"shared memory {compiled.metadata.shared} > {SHARED_LIMIT}")
        if report["hot_spills"] and default:
            problems.append(f"{report['hot_spills']} spill loads/stores in an innermost loop of a default plan's "
                            "kernel")
        M = bound.get("M")
        if name in GEMMS and bound.get("HAS_BASE") and isinstance(M, int) and M >= 2048 and not wgmma:
            problems.append("GEMM at M >= 2048 without wgmma")
        status = "FAIL" if problems else "ok  "
        if problems:
            failed.append(label)
        print(f"{status}  {label}  shared={compiled.metadata.shared} regs={report['registers']} "
              f"spills={report['spills']} hot={report['hot_spills']} wgmma={'yes' if wgmma else 'no'}"
              f"{'' if default else ' (forced plan only)'}{'  ' + '; '.join(problems) if problems else ''}", flush=True)
    print(f"{len(found) - len(failed)} of {len(found)} kernel variants compile for sm_90 within limits")
    return 1 if failed or not found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
