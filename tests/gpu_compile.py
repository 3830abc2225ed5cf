"""Compile every kernel variant the launchers ask for, for an H100 (sm_90), without a GPU.

The interpreter hides what only the GPU compiler refuses (dot shapes, types, control flow, shared
memory). Triton ships ptxas, so the real compile runs on CPU: this script drives the public API with
the GPU's block configurations, records each launch instead of running it, and compiles every distinct
variant. Run as `python tests/gpu_compile.py` (tests/test_gpu_compile.py does, in a subprocess,
because the test session runs the interpreter). Prints one line per variant; exits 1 on any failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: this compiles for the GPU"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fusedlora  # noqa: E402
import fusedlora.core.backend  # noqa: E402
from fusedlora.kernels.dropout import keep_mask  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from multi_providers import multi_lora_linear_unfused  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8",
        torch.int32: "*i32", torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages")


def _type_of(value):
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def record_launches(drive):
    """Run drive() with kernel launches recorded instead of executed: [(kernel, signature, constexprs, options)]."""
    seen = {}

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        sig, consts = {}, {}
        for name in self.arg_names:
            if name in kwargs:
                sig[name], consts[name] = "constexpr", kwargs[name]
            else:
                sig[name] = _type_of(bound[name])
        key = (self.fn.__name__, tuple(sig.items()), repr(sorted(consts.items(), key=str)), tuple(options.items()))
        seen.setdefault(key, (self, sig, consts, options))

    original = JITFunction.run
    JITFunction.run = run
    fusedlora.core.backend.interpreting = lambda: True  # let FUSEDLORA_BACKEND=triton through on CPU tensors
    try:
        drive()
    finally:
        JITFunction.run = original
    return list(seen.values())


def drive():
    """Call the public API the ways a user does, so every launcher picks its GPU configuration."""
    os.environ["FUSEDLORA_BACKEND"] = "triton"
    for plan in ("fused", "split"):
        os.environ["FUSEDLORA_PLAN"] = plan
        for M, dt, adapter_dt, p in ((8192, torch.bfloat16, torch.float32, 0.1),
                                     (16, torch.float16, torch.float16, 0.0), (40, torch.bfloat16, torch.float32, 0.1),
                                     (300, torch.float32, torch.float32, 0.0)):
            x = torch.randn(M, 256, dtype=dt, requires_grad=True)
            W = torch.randn(192, 256, dtype=dt, requires_grad=True)
            b = torch.randn(192, dtype=dt)
            A = torch.randn(16, 256, dtype=adapter_dt, requires_grad=True)
            B = torch.randn(192, 16, dtype=adapter_dt, requires_grad=True)
            fusedlora.lora_linear(x, W, b, A, B, 2.0, p, seed=5).sum().backward()
            fusedlora.lora_add(torch.randn(M, 192, dtype=dt, requires_grad=True), x, A, B, 2.0, p, seed=5).sum().backward()
    os.environ.pop("FUSEDLORA_PLAN")
    # Multi-adapter: each plan at a prefill size and at decode sizes (the decode plan runs its kernels
    # up to 64 rows, the split plan above), with and without ranks, adapters in fp32 and in x's dtype.
    for plan in ("fused", "split", "decode"):
        os.environ["FUSEDLORA_PLAN"] = plan
        for M, dt, adapter_dt, with_ranks in ((4096, torch.bfloat16, torch.float32, True),
                                              (64, torch.float16, torch.float32, False),
                                              (16, torch.bfloat16, torch.bfloat16, True),
                                              (1, torch.float32, torch.float32, True)):
            x = torch.randn(M, 256, dtype=dt, requires_grad=True)
            W = torch.randn(192, 256, dtype=dt)
            b = torch.randn(192, dtype=dt)
            A = torch.randn(8, 16, 256, dtype=adapter_dt, requires_grad=True)
            B = torch.randn(8, 192, 16, dtype=adapter_dt, requires_grad=True)
            s = torch.ones(8)
            ranks = torch.randint(0, 17, (8,), dtype=torch.int32) if with_ranks else None
            ids = torch.randint(-1, 8, (M,))
            fusedlora.multi_lora_linear(x, W, b, A, B, s, ids, ranks).sum().backward()
            if M == 16:  # adapters trained, x without a gradient: dU without dX
                fusedlora.multi_lora_linear(x.detach(), W, b, A, B, s, ids, ranks).sum().backward()
            with torch.no_grad():
                fusedlora.multi_lora_linear(x, W, None, A, B, s, ids, ranks)
            multi_lora_linear_unfused(x, W, None, A, B, s, ids, ranks)
    del os.environ["FUSEDLORA_PLAN"]
    keep_mask(7, 64, 64, 1 << 20, "cpu")


def main():
    variants = record_launches(drive)
    failed = 0
    for kernel, sig, consts, options in variants:
        label = f"{kernel.fn.__name__} {options} " + " ".join(f"{k}={v}" for k, v in consts.items())
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts), target=TARGET, options=options)
            print(f"ok    {label}  shared={compiled.metadata.shared}", flush=True)
        except Exception as exc:  # report every failing variant, not only the first
            failed += 1
            print(f"FAIL  {label}\n      {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
    print(f"{len(variants) - failed} of {len(variants)} kernel variants compile for sm_90")
    return 1 if failed or not variants else 0


if __name__ == "__main__":
    sys.exit(main())
