"""Does the direct launch compute what Triton's own launch computes, on this machine? Seconds, not minutes.

    python benchmarks/launch_check.py [--json FILE]

kernels/launch.py sends every launch after a specialization's first straight to the compiled kernel's
launcher (`compiled.run(...)`), past Triton's binder; `Bound` does the same for the per-shape caches.
On CPU that path only ever ran against stand-ins (tests/fast_launch_check.py). Here each kernel kind
runs with the fast path on, twice (the second call takes the direct launch), and then with it off
(plain `kernel[grid]`), on the same inputs: the same compiled kernel on the same inputs must give the
same bits. Both are also held against a float64 reference written from each kernel's math. The
shapes keep every output element the work of one program, so that lora_dy's atomic dB stays exact.

Exits 0 when every kind matched, 1 on any mismatch or error: benchmarks/gpu_session.sh then runs every
later step with FUSEDLORA_FAST_LAUNCH=0. Without CUDA it needs TRITON_INTERPRET=1, and both runs take
`kernel[grid]` (the interpreter never takes the fast path): the check still runs every kind.

FUSEDLORA_LAUNCH_CHECK_FORCE=mismatch (one element of the first kind's fast result moved by one ulp) or
=error (the first kind raises) fakes a failure, and only that kind runs; read here only:
tests/test_gpu_session.py forces the session's switch with it.
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("launch_check: no CUDA device; set TRITON_INTERPRET=1 to run the kernels in the Triton interpreter")
FORCE = os.environ.get("FUSEDLORA_LAUNCH_CHECK_FORCE", "")
if FORCE not in ("", "mismatch", "error"):
    sys.exit(f"launch_check: FUSEDLORA_LAUNCH_CHECK_FORCE must be mismatch or error, got {FORCE!r}")
os.environ["FUSEDLORA_BACKEND"] = "triton"  # the public calls below must reach the kernels

from triton.runtime.jit import JITFunction  # noqa: E402

import fusedlora  # noqa: E402
from fusedlora.core import reference  # noqa: E402
from fusedlora.core.dropout import dropout_mask, keep_threshold  # noqa: E402
from fusedlora.kernels import launch  # noqa: E402
from fusedlora.kernels.lora_backward import backward_launcher, lora_backward  # noqa: E402
from fusedlora.kernels.lora_gemm import gemm_shrink_launcher, lora_expand, lora_gemm, lora_gemm_shrink  # noqa: E402
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink  # noqa: E402
from fusedlora.kernels.multi_decode import decode_launcher  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Odd sizes (masked edges); M within one row block of every kernel (lora_dy adds dB with atomics).
M, K, N, R, L, MULTI_M = 24, 72, 40, 8, 3, 80
P, SEED, SCALE = 0.25, 1234, 0.5
# Norm-wise against float64: loose enough for tf32 products (2^-11) should torch allow them, tight
# enough for what a wrong launch gives (wrong pointers, strides or scalars: errors of order 1).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def _inputs():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    t = dict(x=randn(M, K), W=randn(N, K) / 8, b=randn(N), A=randn(R, K) / 8, B=randn(N, R), S=randn(M, R),
             dy=randn(M, N), g=randn(N).abs() + 0.5, A3=randn(L, R, K) / 8, B3=randn(L, N, R), s3=randn(L).abs(),
             mx=randn(MULTI_M, K), mdy=randn(MULTI_M, N))
    t["keep_mk"] = dropout_mask(SEED, (M, K), P).to(DEVICE)  # torch's Philox, the same bits as the kernels'
    t["keep_mn"] = dropout_mask(SEED, (M, N), P).to(DEVICE)
    t["ids"] = (torch.arange(M) % (L + 1) - 1).to(DEVICE)  # every adapter, and base-only rows (-1)
    t["mids"] = (torch.arange(MULTI_M) * 7 % (L + 1) - 1).to(DEVICE)
    t["ranks"] = torch.tensor([R, 3, 5], dtype=torch.int32, device=DEVICE)
    return t


def _d(t):
    return t.double()


def _multi(plan, t):
    """multi_lora_linear forward and backward under one plan: y, dx, dA, dB (the multi-adapter kernels)."""
    def run():
        previous = os.environ.get("FUSEDLORA_PLAN")
        os.environ["FUSEDLORA_PLAN"] = plan
        try:
            rows = M if plan == "decode" else MULTI_M
            x = t["mx"][:rows].clone().requires_grad_()
            A, B = t["A3"].clone().requires_grad_(), t["B3"].clone().requires_grad_()
            y = fusedlora.multi_lora_linear(x, t["W"], t["b"], A, B, t["s3"], t["mids"][:rows], t["ranks"])
            y.backward(t["mdy"][:rows])
            return dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad)
        finally:
            if previous is None:
                del os.environ["FUSEDLORA_PLAN"]
            else:
                os.environ["FUSEDLORA_PLAN"] = previous

    def exact():
        rows = M if plan == "decode" else MULTI_M
        x, A, B = (_d(t[n][:rows] if n == "mx" else t[n]).requires_grad_() for n in ("mx", "A3", "B3"))
        y = reference.multi_lora_linear(x, _d(t["W"]), _d(t["b"]), A, B, _d(t["s3"]), t["mids"][:rows], t["ranks"])
        y.backward(_d(t["mdy"][:rows]))
        return dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad)

    return run, exact


def kinds(t):
    """(name, run, exact, dtype): run() launches and returns its outputs, exact() the float64 ones."""
    d = {n: _d(v) for n, v in t.items() if v.is_floating_point()}
    threshold = keep_threshold(P)
    keep_x = d["x"] * t["keep_mk"]
    du = SCALE * d["dy"] @ d["B"]
    xb, Wb, bb = (t[n].bfloat16() for n in ("x", "W", "b"))

    def gemm_shrink_bound():
        out, S = torch.empty(M, N, device=DEVICE), torch.empty(M, R, device=DEVICE)
        run = bound["gemm_shrink"]
        run(t["x"], t["W"], t["b"], t["A"], t["B"], out, SEED, threshold, SCALE, S=S)
        return dict(out=out, S=S)

    def decode_bound():
        out = torch.empty(M, N, device=DEVICE)
        bound["decode"](t["x"], t["W"], t["A3"], t["B3"], t["s3"], t["ids"], t["ranks"], t["b"], out)
        return dict(out=out)

    # The Bound launchers are made once: their first call compiles, their later calls launch directly.
    bound = dict(
        gemm_shrink=gemm_shrink_launcher(t["x"], t["W"], t["b"], t["A"], t["B"], torch.empty(M, R, device=DEVICE),
                                         torch.empty(M, N, device=DEVICE), True),
        backward=backward_launcher(t["dy"], t["W"], t["A"], t["B"], t["x"], t["S"], True, True, True, True,
                                   (M, K), torch.float32),
        decode=decode_launcher(t["x"], t["W"], t["A3"], t["B3"], t["s3"], t["ids"], t["ranks"], t["b"],
                               torch.empty(M, N, device=DEVICE)))
    S_exact = SCALE * keep_x @ d["A"].T
    backward_exact = dict(dx=d["dy"] @ d["W"] + t["keep_mk"] * (du @ d["A"]), dA=du.T @ keep_x, dB=d["dy"].T @ d["S"])
    return [
        ("lora_gemm", lambda: dict(out=lora_gemm(t["x"], t["W"], t["b"], p=t["S"], q=t["B"], seed=SEED,
                                                 threshold=threshold, dropout=True)),
         lambda: dict(out=d["x"] @ d["W"].T + d["b"] + t["keep_mn"] * (d["S"] @ d["B"].T)), torch.float32),
        ("lora_gemm bf16", lambda: dict(out=lora_gemm(xb, Wb, bb, p=t["S"], q=t["B"])),
         lambda: dict(out=_d(xb) @ _d(Wb).T + _d(bb) + d["S"] @ d["B"].T), torch.bfloat16),
        ("lora_gemm col_scale", lambda: dict(out=lora_gemm(t["x"], t["W"], t["b"], p=t["S"], q=t["B"],
                                                           col_scale=t["g"])),
         lambda: dict(out=d["g"] * (d["x"] @ d["W"].T + d["S"] @ d["B"].T) + d["b"]), torch.float32),
        ("lora_gemm_shrink", lambda: dict(zip(("out", "S"), lora_gemm_shrink(
            t["x"], t["W"], t["b"], t["A"], t["B"], SCALE, SEED, threshold, dropout=True))),
         lambda: dict(out=d["x"] @ d["W"].T + d["b"] + S_exact @ d["B"].T, S=S_exact), torch.float32),
        ("lora_expand", lambda: dict(out=lora_expand(t["S"], t["B"], t["b"], addend=t["dy"])),
         lambda: dict(out=d["dy"] + d["b"] + d["S"] @ d["B"].T), torch.float32),
        ("lora_shrink", lambda: dict(S=lora_shrink(t["x"], t["A"], SCALE, SEED, threshold, dropout=True)),
         lambda: dict(S=S_exact), torch.float32),
        ("lora_dy", lambda: dict(zip(("dU", "dB"), lora_dy(t["dy"], t["B"], t["S"], SCALE))),
         lambda: dict(dU=du, dB=d["dy"].T @ d["S"]), torch.float32),
        ("lora_backward", lambda: dict(zip(("dx", "dA", "dB"), lora_backward(
            t["dy"], t["W"], t["A"], t["B"], t["x"], t["S"], SCALE, SEED, threshold, dropout=True))),
         lambda: backward_exact, torch.float32),
        ("gemm_shrink_launcher (Bound)", gemm_shrink_bound,
         lambda: dict(out=d["x"] @ d["W"].T + d["b"] + S_exact @ d["B"].T, S=S_exact), torch.float32),
        ("backward_launcher (Bound)", lambda: dict(zip(("dx", "dA", "dB"), bound["backward"](
            t["dy"], t["W"], t["A"], t["B"], t["x"], t["S"], SCALE, SEED, threshold))),
         lambda: backward_exact, torch.float32),
        ("decode_launcher (Bound)", decode_bound,
         lambda: dict(out=reference.multi_lora_linear(d["x"], d["W"], d["b"], d["A3"], d["B3"], d["s3"], t["ids"],
                                                      t["ranks"])), torch.float32),
        ("multi fused fwd+bwd", *_multi("fused", t), torch.float32),
        ("multi split fwd+bwd", *_multi("split", t), torch.float32),
        ("multi decode fwd+bwd", *_multi("decode", t), torch.float32),
    ]


def _first_difference(a, b) -> str:
    diff = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    index = tuple(int(i) for i in diff.nonzero()[0])
    return f"{int(diff.sum())} of {a.numel()} elements differ, first at {index}: fast {a[index].item()!r}, " \
           f"plain {b[index].item()!r}"


def check(name, run, exact, dtype, force):
    """One kind: fast twice, then plain; the verdict as a dict."""
    result = dict(kind=name, ok=False)
    binder_runs = []
    original = JITFunction.run
    try:
        if force == "error":
            raise RuntimeError("forced by FUSEDLORA_LAUNCH_CHECK_FORCE=error")
        launch.set_fast_launch(True)
        run()  # the first sight of each specialization: Triton's binder, then the compiled kernel is kept
        JITFunction.run = lambda self, *a, **k: binder_runs.append(1) or original(self, *a, **k)
        try:
            fast = run()  # on a GPU: the direct launch
        finally:
            JITFunction.run = original
        launch.set_fast_launch(False)
        plain = run()
        if force == "mismatch":
            first = next(iter(fast.values())).view(-1)
            first[0] = torch.nextafter(first[0], torch.tensor(float("inf"), dtype=first.dtype, device=first.device))
        if CUDA:
            torch.cuda.synchronize()
        expected = exact()
        problems, errors = [], {}
        for key, got in fast.items():
            if not torch.equal(got, plain[key]):
                problems.append(f"{key}: fast != plain: {_first_difference(got, plain[key])}")
            want = expected[key]
            err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
            errors[key] = err
            if not err <= TOLERANCE[dtype]:  # NaN fails too
                both = " (as far off through kernel[grid]: the kernel, not the launch)" if torch.equal(
                    got, plain[key]) else ""
                problems.append(f"{key}: {err:.3g} off float64 (norm-wise), tolerance {TOLERANCE[dtype]:g}{both}")
        result.update(ok=not problems, problems=problems, max_error=max(errors.values()),
                      binder_runs_in_fast_call=len(binder_runs))
    except Exception:  # noqa: BLE001 - any failure of a kind is the verdict, reported with its traceback
        result.update(problems=[traceback.format_exc()])
    finally:
        JITFunction.run = original
        launch.set_fast_launch(True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the verdicts here")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    launch.set_fast_launch(True)
    fast_possible = launch.fast_launch()
    print(f"launch check on {torch.cuda.get_device_name() if CUDA else 'CPU (Triton interpreter)'}: "
          + ("fast path, twice, then plain kernel[grid]" if fast_possible else
             "the interpreter never takes the fast path: both runs take kernel[grid]"), flush=True)
    try:
        every = kinds(_inputs())
    except Exception:  # noqa: BLE001
        print("FAIL setting up the inputs and launchers:\n" + traceback.format_exc())
        return 1
    results = []
    for name, run, exact, dtype in every[:1] if FORCE else every:  # a forced failure needs no other kind
        result = check(name, run, exact, dtype, FORCE)
        results.append(result)
        direct = result.get("binder_runs_in_fast_call")
        note = f"; Triton's binder ran {direct} times in the fast call" if fast_possible and direct else ""
        if result["ok"]:
            print(f"  ok       {name:30} fast == plain bitwise; {result['max_error']:.2g} off float64{note}", flush=True)
        else:
            print(f"  FAIL     {name:30} " + "\n           ".join(result["problems"]), flush=True)
    failed = [r["kind"] for r in results if not r["ok"]]
    seconds = time.monotonic() - t0
    print(f"launch check: {'FAIL' if failed else 'PASS'}, {len(results) - len(failed)} of {len(results)} kinds "
          f"matched in {seconds:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ok=not failed, seconds=round(seconds, 1), force=FORCE, kinds=results), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
