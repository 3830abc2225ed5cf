"""Launches through kernels/launch.py's fast path pick the compiled kernel Triton's own binder picks and
pass it the same arguments. Run as `python tests/fast_launch_check.py` without TRITON_INTERPRET
(tests/test_fast_launch.py does, in a subprocess): it takes benchmarks/host.py's sm_90 host path,
where Triton binds and keys every launch for an H100 and only the C launcher is replaced by a stand-in
(one per specialization) that records what it is given. Exits 1 on any difference."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import host  # noqa: E402

host.install_sm90_host_path()

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fusedlora  # noqa: E402
from fusedlora.kernels import launch  # noqa: E402
from fusedlora.kernels.lora_backward import lora_backward  # noqa: E402
from fusedlora.kernels.lora_gemm import lora_expand, lora_gemm, lora_gemm_shrink  # noqa: E402
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink  # noqa: E402

K, N, R = 64, 48, 16
# Seeds and thresholds across Triton's integer specializations: 1, multiples of 16, i32, i64, u64.
INTS = (0, 1, 16, 17, 2**30, 2**31 - 16, 2**31, 2**31 + 5, 2**32, 2**63 - 16, 2**63, 2**63 + 16)


def tensors(dtype):
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(40 * K + 1, generator=g).to(dtype)
    return dict(flat=flat, W=torch.randn(N, K, generator=g).to(dtype), A=torch.randn(R, K, generator=g).to(dtype),
                B=torch.randn(N, R, generator=g).to(dtype), b=torch.randn(N, generator=g).to(dtype),
                mA=torch.randn(3, R, K, generator=g).to(dtype), mB=torch.randn(3, N, R, generator=g).to(dtype),
                s=torch.ones(3), ranks=torch.tensor([16, 5, 9], dtype=torch.int32))


def drive(t):
    for M in (1, 16, 17, 40):
        for offset in (0, 1):  # offset 1: x's address is not a multiple of 16 bytes
            x = t["flat"][offset:offset + M * K].view(M, K)
            for seed in INTS:
                S = lora_shrink(x, t["A"], 0.5, seed, seed // 3, dropout=True)
                lora_gemm(x, t["W"], t["b"], p=S, q=t["B"], seed=seed, threshold=seed // 5, dropout=seed % 2 == 0)
                lora_expand(S, t["B"], addend=x[:, :N], seed=seed, threshold=7, dropout=True)
                lora_dy(x[:, :N], t["B"], S, 2.0)
                lora_gemm_shrink(x, None, None, t["A"], t["B"], 0.5, seed, seed // 3, dropout=True, addend=x[:, :N])
                lora_backward(x[:, :N], t["W"], t["A"], t["B"], x, S, 2.0, seed, seed // 3, dropout=seed % 2 == 0)
                lora_backward(x[:, :N], None, t["A"], t["B"], x, S, 2.0, compute_db=False)
            lora_shrink(x.t(), t["A"][:, :M], 1.0, mask_transposed=True)  # transposed strides
        # Multi-adapter: the decode kernels (M <= 64) and the segment kernels (above).
        for rows in (M, 3 * M + 70):
            xm = t["flat"][:K].expand(rows, K).contiguous()
            ids = torch.arange(rows) % 4 - 1
            fusedlora.multi_lora_linear(xm, t["W"], t["b"], t["mA"], t["mB"], t["s"], ids, t["ranks"])


def comparable(args):
    return tuple((a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a
                 for a in args)


def recorded(fast: bool, t):
    launch.set_fast_launch(fast)
    drive(t)  # first sight of each specialization: the plain launch
    host._Skipped.record = record = []
    plain_runs = []
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **k: plain_runs.append(1) or original(self, *a, **k)
    try:
        drive(t)
    finally:
        JITFunction.run = original
        host._Skipped.record = None
    return [(stand_in.key, comparable(args)) for stand_in, args in record], len(plain_runs)


def main():
    failed = 0
    if not launch.fast_launch():
        failed += 1
        print("FAIL: the fast path is off without FUSEDLORA_FAST_LAUNCH")
    for dtype in (torch.float32, torch.bfloat16):
        t = tensors(dtype)
        slow, slow_plain = recorded(False, t)
        fast, fast_plain = recorded(True, t)
        if fast_plain:
            failed += 1
            print(f"FAIL {dtype}: {fast_plain} launches took Triton's binder with the fast path on")
        if len(fast) != len(slow) or not slow:
            failed += 1
            print(f"FAIL {dtype}: {len(fast)} fast launches against {len(slow)} plain ones")
        for i, (a, b) in enumerate(zip(fast, slow)):
            if a != b:
                failed += 1
                print(f"FAIL {dtype} launch {i}: fast {a}\n     plain {b}")
                break
        print(f"{dtype}: {len(slow)} launches, {len({k for k, _ in slow})} specializations, slow path binder runs "
              f"{slow_plain}, fast path binder runs {fast_plain}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
