"""Tune the kernels' tiles and the planner's crossover on the GPU at hand, and write its table.

    python benchmarks/tune.py [--out DIR]    on a GPU: a few minutes
    python benchmarks/tune.py --dry-run      without a GPU: the plumbing through the interpreter

1. Plan crossover: fusedlora.lora_linear (bf16, K = N = 4096, r = 16) forward, and forward plus
   backward, under each plan (FUSEDLORA_PLAN) from M = 16 to 2048. split_from_m[direction] is the
   smallest M from which the split plan is at least as fast at that M and every larger one measured.
2. MoE plan crossover: one expert projection with LoRA (plans/moe.py; Qwen3-30B-A3B's gate_up: E = 128,
   2048 -> 1536, top-8, r = 16, bf16) forward, and forward plus backward, under each plan from 16 to
   4096 tokens. moe_decode_max_pairs is the most pairs up to which decode is the fastest plan at every
   count measured, moe_split_from_pairs[direction] the fewest from which split beats fused at every
   larger count (as split_from_m).
3. Kernel tiles: for each kernel and shape bucket below, every candidate configuration is checked
   against the default configuration's output on the same inputs, then timed (median of
   triton.testing.do_bench, L2 flushed); the fastest that agrees goes into the table. The MoE kernels'
   buckets count (token, expert) pairs, at the MoE shape above.

Writes, in DIR (default benchmarks/results): tune-<gpu>.jsonl (one row per measurement, as it
finishes) and tune-<gpu>.json, and <gpu>-configs.json, the table in kernels/configs.py's format,
rewritten after each kernel and bucket; copy it to kernels/configs/<GPU name>.json to use it. A
SIGTERM writes what is done (benchmarks/record.py).
Without a GPU (or with --dry-run) the kernels run in the Triton interpreter at tiny sizes with two
candidates per kernel and bucket, checked but not timed; the table then keeps every default.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if __name__ == "__main__" and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

import triton  # noqa: E402
import triton.testing  # noqa: E402,F401

import fusedlora  # noqa: E402
from fusedlora.kernels import configs  # noqa: E402
from fusedlora.kernels.lora_gemm import lora_expand, lora_gemm  # noqa: E402
from fusedlora.kernels.lora_shrink import lora_shrink  # noqa: E402
from fusedlora.kernels.moe_lora import moe_gemm, moe_shrink  # noqa: E402
from fusedlora.kernels.moe_reduce import moe_reduce  # noqa: E402
from fusedlora.core.moe_routing import ExpertRouting  # noqa: E402
from fusedlora.plans import moe as moe_plans  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import suite  # noqa: E402
from record import Record, _atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CROSSOVER_M = (16, 32, 64, 128, 256, 512, 1024, 2048)
# MoE: (E, K, N, top-k, r) of the tuned projection, tokens of the plan crossover.
MOE_SHAPE = (128, 2048, 1536, 8, 16)
MOE_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 4096)
MOE_PLANS = ("decode", "fused", "split")


def _gemm(bm, bn, bk, warps, stages, group=8):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


# kernel: (buckets of M, candidates); the first candidate of each list is tried first. On an H200,
# 128x256x64 with 4 stages needs 245,800 bytes of shared memory, over the 232,448 there are.
GPU_CANDIDATES = {
    "lora_gemm": ((16, 2048, 8192), [
        _gemm(128, 128, 64, 8, 3), _gemm(128, 256, 64, 8, 3), _gemm(128, 128, 64, 4, 4), _gemm(64, 128, 64, 4, 4),
        _gemm(16, 64, 128, 4, 4), _gemm(16, 32, 128, 4, 4), _gemm(16, 64, 256, 4, 3)]),
    "lora_expand": ((16, 2048), [
        _gemm(64, 128, 16, 4, 2), _gemm(128, 128, 16, 8, 2), _gemm(64, 256, 16, 8, 2), _gemm(16, 128, 16, 4, 2)]),
    "lora_shrink": ((16, 2048), [
        dict(BLOCK_M=64, BLOCK_C=128, num_warps=4, num_stages=3), dict(BLOCK_M=16, BLOCK_C=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_C=256, num_warps=4, num_stages=3), dict(BLOCK_M=128, BLOCK_C=64, num_warps=8, num_stages=4)]),
}
# MoE kernels, buckets in (token, expert) pairs: 16 tokens (128 pairs: decode), 256 and 4096 tokens at top-8.
# moe_gemm's are tried with the shrink in the K loop (the fused forward), which bounds its tiles.
GPU_CANDIDATES.update({
    "moe_gemm": ((2048, 32768), [
        _gemm(128, 128, 64, 8, 3), _gemm(64, 128, 64, 4, 4), _gemm(128, 256, 64, 8, 3), _gemm(64, 256, 64, 8, 3),
        _gemm(128, 128, 32, 8, 4), _gemm(32, 128, 64, 4, 4)]),
    "moe_decode": ((128, 256), [
        _gemm(16, 64, 64, 4, 4, group=1), _gemm(16, 32, 128, 4, 4, group=1), _gemm(16, 128, 64, 4, 3, group=1),
        _gemm(32, 64, 64, 4, 4, group=1)]),
    "moe_shrink": ((2048, 32768), [
        dict(BLOCK_M=64, BLOCK_C=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_C=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_C=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=32, BLOCK_C=256, num_warps=4, num_stages=3)]),
    "moe_reduce": ((128, 32768), [
        dict(BLOCK_A=64, BLOCK_B=64, BLOCK_T=64, num_warps=4, num_stages=3),
        dict(BLOCK_A=64, BLOCK_B=128, BLOCK_T=64, num_warps=4, num_stages=3),
        dict(BLOCK_A=64, BLOCK_B=64, BLOCK_T=32, num_warps=4, num_stages=4),
        dict(BLOCK_A=64, BLOCK_B=256, BLOCK_T=32, num_warps=8, num_stages=3)]),
})
# Without a GPU: two candidates each, small enough for the interpreter.
CPU_CANDIDATES = {
    "lora_gemm": ((16,), [_gemm(32, 32, 32, 4, 1, group=4), _gemm(16, 32, 32, 4, 1, group=4)]),
    "lora_expand": ((16,), [_gemm(32, 32, 16, 4, 1, group=4), _gemm(16, 32, 16, 4, 1, group=4)]),
    "lora_shrink": ((16,), [dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=1),
                            dict(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)]),
    "moe_gemm": ((16,), [_gemm(16, 32, 32, 4, 1, group=4), _gemm(16, 16, 16, 4, 1, group=4)]),
    "moe_decode": ((16,), [_gemm(16, 32, 32, 4, 1, group=1), _gemm(16, 16, 16, 4, 1, group=1)]),
    "moe_shrink": ((16,), [dict(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1),
                           dict(BLOCK_M=16, BLOCK_C=16, num_warps=4, num_stages=1)]),
    "moe_reduce": ((16,), [dict(BLOCK_A=16, BLOCK_B=32, BLOCK_T=16, num_warps=4, num_stages=1),
                           dict(BLOCK_A=16, BLOCK_B=16, BLOCK_T=16, num_warps=4, num_stages=1)]),
}
# The MoE shape without a GPU: (E, K, N, top-k, r).
MOE_CPU_SHAPE = (4, 64, 48, 2, 16)


def force(kernel, M, cfg):
    """Make cfg the configuration of `kernel` for M's bucket on this target, in the loaded table."""
    entry = configs.table(configs.target(DEVICE)).setdefault("kernels", {}).setdefault(kernel, {})
    entry[str(configs.bucket(M))] = dict(cfg)
    configs.clear_caches(tables=False)


def forget(kernel, M):
    configs.table(configs.target(DEVICE)).get("kernels", {}).get(kernel, {}).pop(str(configs.bucket(M)), None)
    configs.clear_caches(tables=False)


def moe_inputs(T, dtype):
    """x, the routing, W, A, B of the MoE projection (MOE_SHAPE) for T tokens, random routing."""
    E, K, N, k, r = MOE_SHAPE if CUDA else MOE_CPU_SHAPE
    top_k_index = torch.rand(T, E, device=DEVICE).topk(k, dim=1).indices
    return (torch.randn(T, K, device=DEVICE, dtype=dtype), ExpertRouting(top_k_index, E),
            torch.randn(E, N, K, device=DEVICE, dtype=dtype) / K ** 0.5,
            torch.randn(1, E, r, K, device=DEVICE, dtype=dtype) / K ** 0.5,
            torch.randn(1, E, N, r, device=DEVICE, dtype=dtype))


def moe_kernel_call(kernel, P, dtype):
    """A call of a MoE kernel's launcher at P pairs of the MoE shape."""
    k = (MOE_SHAPE if CUDA else MOE_CPU_SHAPE)[3]
    x, routing, w, a, b = moe_inputs(P // k, dtype)
    groups = moe_plans.groups_of(routing)
    if kernel in ("moe_gemm", "moe_decode"):
        out = torch.empty(routing.P, w.shape[1], device=DEVICE, dtype=dtype)
        S = torch.empty(routing.P, a.shape[2], device=DEVICE, dtype=torch.float32)
        return lambda: moe_gemm(x, w, None, a, b, groups, out, u=S, shrink=True, store_u=True, scale=2.0,
                                gather=True, decode=kernel == "moe_decode")
    if kernel == "moe_shrink":
        return lambda: moe_shrink(x, a, groups, 2.0, gather=True)
    dU = torch.randn(routing.P, a.shape[2], device=DEVICE)
    dA = torch.empty(a.shape, device=DEVICE, dtype=dtype)
    return lambda: moe_reduce(dU, x, groups, dA, gather_z=True)


def kernel_call(kernel, M, K, N, r, dtype):
    """A call of the kernel's launcher on fresh random inputs (never zeros)."""
    if kernel.startswith("moe_"):
        return moe_kernel_call(kernel, M, dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    s = torch.randn(M, r, device=DEVICE, dtype=torch.float32)
    a = torch.randn(r, K, device=DEVICE, dtype=dtype) / K ** 0.5
    b = torch.randn(N, r, device=DEVICE, dtype=dtype)
    if kernel == "lora_gemm":
        return lambda: lora_gemm(x, w, p=s, q=b)
    if kernel == "lora_expand":
        addend = torch.randn(M, N, device=DEVICE, dtype=dtype)
        return lambda: lora_expand(s, b, addend=addend)
    return lambda: lora_shrink(x, a, 2.0)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tune_kernels(candidates, shape, record, write_table, log):
    K, N, r, dtype = shape
    # Tile order changes the summation order only: a candidate that disagrees beyond a few roundings
    # of the output dtype computes something else.
    bound = 8 * torch.finfo(dtype).eps
    for kernel, (buckets, cands) in candidates.items():
        for M in buckets:
            call = kernel_call(kernel, M, K, N, r, dtype)
            forget(kernel, M)
            ref = call().clone()
            best = None
            for cfg in cands:
                row = dict(kind="config", kernel=kernel, M=M, K=K, N=N, r=r, config=cfg, ms=None, rel_err=None, ok=False)
                force(kernel, M, cfg)
                try:
                    row["rel_err"] = rel_err(call(), ref)
                    row["ok"] = row["rel_err"] <= bound
                    if row["ok"] and CUDA:
                        row["ms"] = triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")
                except Exception as error:  # noqa: BLE001 (a config the GPU refuses: out of resources, ...)
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                record.add(row)
                timing = "" if row["ms"] is None else f" {row['ms']:.4f} ms"
                log(f"{kernel:12} M={M:<5} {cfg} -> {row.get('error') or ('ok' if row['ok'] else 'WRONG')}{timing}")
                if row["ok"] and row["ms"] is not None and (best is None or row["ms"] < best[0]):
                    best = (row["ms"], cfg)
            forget(kernel, M)
            if best is not None:
                TABLE.setdefault("kernels", {}).setdefault(kernel, {})[str(configs.bucket(M))] = best[1]
            write_table()


def crossover(shape, ms_list, record, log):
    """{direction: split_from_m} from timings of each plan (None where untimed)."""
    K, N, r, dtype = shape
    times = {}
    for M in ms_list:
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
        a = (torch.randn(r, K, device=DEVICE, dtype=dtype) / K ** 0.5).requires_grad_()
        b = torch.randn(N, r, device=DEVICE, dtype=dtype).requires_grad_()
        dy = torch.randn(M, N, device=DEVICE, dtype=dtype)

        def forward():
            with torch.no_grad():
                return fusedlora.lora_linear(x, w, None, a, b, 2.0)

        def forward_backward():
            return torch.autograd.grad(fusedlora.lora_linear(x, w, None, a, b, 2.0), (x, a, b), dy)

        for plan in ("fused", "split"):
            with suite.provider_plan(f"fusedlora[{plan}]"):
                for direction, fn in (("forward", forward), ("forward_backward", forward_backward)):
                    fn()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") if CUDA else None
                    times[direction, plan, M] = ms
                    record.add(dict(kind="plan", direction=direction, plan=plan, M=M, K=K, N=N, r=r, ms=ms))
                    log(f"plan {plan:5} {direction:16} M={M:<5} " + ("untimed" if ms is None else f"{ms:.4f} ms"))
    found = {}
    for direction, key in (("forward", "forward"), ("backward", "forward_backward")):
        if any(times[key, p, M] is None for p in ("fused", "split") for M in ms_list):
            continue
        wins = [times[key, "split", M] <= times[key, "fused", M] for M in ms_list]
        # The smallest M from which split wins at every larger M measured (past the largest: never).
        first = len(ms_list)
        while first > 0 and wins[first - 1]:
            first -= 1
        found[direction] = ms_list[first] if first < len(ms_list) else ms_list[-1] * 2
    return found


def moe_crossover(tokens, dtype, record, log):
    """{"moe_decode_max_pairs": ..., "moe_split_from_pairs": {direction: ...}} from timings of each MoE plan
    (empty where untimed)."""
    E, K, N, k, r = MOE_SHAPE if CUDA else MOE_CPU_SHAPE
    times = {}
    for T in tokens:
        x, routing, w, a, b = moe_inputs(T, dtype)
        dy = torch.randn(routing.P, N, device=DEVICE, dtype=dtype)
        out = torch.empty(routing.P, N, device=DEVICE, dtype=dtype)

        def forward(plan):
            return moe_plans.forward(plan, x, routing, w, None, a, b, 2.0, None, 0.0, 0, True, out, True)

        def forward_backward(plan):
            return moe_plans.backward(plan, dy, x, routing, w, a, b, 2.0, None, forward(plan), 0.0, 0, True,
                                      (True, False, False, True, True))

        for plan in MOE_PLANS:
            for direction, fn in (("forward", forward), ("forward_backward", forward_backward)):
                fn(plan)
                ms = (triton.testing.do_bench(lambda: fn(plan), warmup=10, rep=40, return_mode="median")
                      if CUDA else None)
                times[direction, plan, T] = ms
                record.add(dict(kind="moe_plan", direction=direction, plan=plan, tokens=T, pairs=T * k, E=E, K=K, N=N,
                                r=r, ms=ms))
                log(f"moe plan {plan:6} {direction:16} T={T:<5} " + ("untimed" if ms is None else f"{ms:.4f} ms"))
    if any(ms is None for ms in times.values()):
        return {}
    fastest = [min(MOE_PLANS, key=lambda plan: times["forward_backward", plan, T]) == "decode" for T in tokens]
    decode_up_to = 0
    while decode_up_to < len(tokens) and fastest[decode_up_to]:
        decode_up_to += 1
    found = {"moe_decode_max_pairs": tokens[decode_up_to - 1] * k if decode_up_to else 0, "moe_split_from_pairs": {}}
    for direction, key in (("forward", "forward"), ("backward", "forward_backward")):
        wins = [times[key, "split", T] <= times[key, "fused", T] for T in tokens]
        first = len(tokens)
        while first > 0 and wins[first - 1]:
            first -= 1
        found["moe_split_from_pairs"][direction] = tokens[first] * k if first < len(tokens) else tokens[-1] * k * 2
    return found


def main(argv=None):
    global DEVICE, TABLE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for the results (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="without a GPU only (the default there)")
    args = parser.parse_args(argv)
    DEVICE = "cuda" if CUDA else "cpu"
    gpu = torch.cuda.get_device_name() if CUDA else None
    stem = report.stem(gpu or "cpu-check")
    out = args.out or RESULTS
    record = Record(out, f"tune-{stem}", suite.header(gpu))
    TABLE = dict(gpu=gpu or configs.INTERPRETER, source=f"benchmarks/tune.py at commit {record.result['commit']}, "
                 f"{record.result['date']}", planner=json.loads(json.dumps(configs.PLANNER)), kernels={})
    table_file = out / f"{stem}-configs.json"

    def write_table():
        _atomic_write(table_file, json.dumps(TABLE, indent=1) + "\n")

    def log(line):
        print(line, flush=True)

    if CUDA:
        shape, candidates, ms_list = (4096, 4096, 16, torch.bfloat16), GPU_CANDIDATES, CROSSOVER_M
    else:
        print("No CUDA GPU: the interpreter at tiny sizes, two candidates per kernel, checked and not timed.")
        shape, candidates, ms_list = (64, 48, 16, torch.float32), CPU_CANDIDATES, (16, 80)
    found = crossover(shape, ms_list, record, log)
    TABLE["planner"]["split_from_m"].update(found)
    log(f"split_from_m: {TABLE['planner']['split_from_m']}" + ("" if found else " (the default: nothing timed)"))
    write_table()
    moe_found = moe_crossover(MOE_TOKENS if CUDA else (8, 16), shape[3], record, log)
    TABLE["planner"].update(moe_found)
    log(f"moe: {moe_found or 'the defaults (nothing timed)'}")
    write_table()
    tune_kernels(candidates, shape, record, write_table, log)
    for path in record.finish() + [table_file]:
        print(f"wrote {path}")
    wrong = [row for row in record.rows if row.get("kind") == "config" and not row["ok"] and "error" not in row]
    for row in wrong:
        print(f"WRONG: {row['kernel']} M={row['M']} {row['config']}: relative error {row['rel_err']:.2e}",
              file=sys.stderr)
    return 1 if wrong else 0


DEVICE, TABLE = "cpu", {}

if __name__ == "__main__":
    sys.exit(main())
