"""The one tolerance table and the oracles every numerical test uses.

Results are compared with a float64 reference run on the same (already rounded) inputs, by one of
two rules.

Componentwise, for one layer (lora_linear, multi_lora_linear: the output and every gradient).
Each result element is a sum of terms that are products of inputs (x_k·W_nk, b_n,
s/(1-p)·x_k·A_jk·B_nj, dy_n·W_nk, ...). Computed in fp32 with at most n roundings (products and
additions) on the path of any one term, each term carries a factor ∏(1+δ_i) with |δ_i| ≤ u, so

    |err| ≤ γ_n · Σ|terms|,   γ_n = n·u / (1 − n·u)

(Higham, Accuracy and Stability of Numerical Algorithms, §3.1) whatever the summation order, the
blocking or the order of atomics. Σ|terms| is the float64 reference run on |inputs| (and |dy|
for gradients): `magnitude`. Rounding a value to its storage format adds at most u_s·|value|: once
at the end (u_s·|exact|), and up to R − 1 times on the way (the split plan rounds S·Bᵀ + b before
the library GEMM adds x·Wᵀ onto it; PyTorch's op-by-op path rounds after every op), each of those
bounded by u_s·magnitude. So

    bound = (γ_n + (R − 1)·u_s)·magnitude·(1 + u_s)^R + u_s·|exact|,  and never below |low − exact|,

low being the PyTorch reference run in the tested dtypes: a bound is never tighter than what torch
itself achieves on that element.

Norm-wise, for whole models (a Llama's logits and gradients, compiled against eager, a fallback
against PEFT). No componentwise bound survives softmax and normalisation layers, whose conditioning
no rule of thumb knows; the same-dtype PyTorch run measures it, tensor by tensor: each tensor T
(logits, each gradient) gets its own noise scale, PyTorch's relative error on it, and

    ‖got_T − exact_T‖ ≤ (F·‖low_T − exact_T‖/‖exact_T‖ + u_s)·‖exact_T‖

(u_s: one rounding of the output is always allowed; the tensor's noise scale is never taken below
RUN_SHARE of the run's worst). Two correct paths are different samples of rounding noise: over the
PEFT interop models, per tensor, measured up to 3.05x apart in fp32 and 2.1x in bf16, hence F = 4.
A bf16 tensor's noise is 5e-3 to 5e-2 of it, which would hide a one-percent scaling error; but such
an error lies along the tensor, where rounding errors put only a small share (about 1/sqrt(numel) of
their norm, when their signs are independent). So the error's component along exact_T, relative to
it, must also stay within SLANT_FACTOR times PyTorch's plus SIGMAS times that share (+ u_s), in
runs with half-precision tensors.
Neither test sees one layer's low-rank term off by 1% in bf16 when that layer barely moves the model's
tensors (measured: layer 0's q_proj scaling x1.01 moved its own lora_A gradient 1.19e-2 along itself
through the kernels, under the 1.27e-2 allowed): the PEFT interop tests also hold each layer, on the
inputs it got in the model run, to the componentwise rule (tests/lora_models.py). Measured by hand
(the scaling fusedlora passes for one layer of the patched PEFT model multiplied, layers 0, 7, 13):
x1.001 fails the fp32 tests, x1.01 the bf16 and autocast ones, on both backends.
benchmarks/providers.py checks providers by the older run-wide rule.
"""
import contextlib
import os
import sys
from typing import NamedTuple

import pytest
import torch

import fusedlora
from fusedlora.core import reference
from fusedlora.core.dropout import draw_seed
from fusedlora.kernels.common import fp32_matmul_allows_tf32

CUDA = torch.cuda.is_available()
# Set by tests/conftest.py before triton loads; kernels then run in the Triton interpreter.
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
# Two paths over the same inputs (compiled and eager, checkpointed and not) agree bit for bit on CPU:
# the same BLAS calls with correctly rounded elementwise ops around them. On CUDA nothing promises
# that (cuBLAS picks algorithms by shape and layout, Inductor writes its own kernels, SDPA's backward
# and fusedlora's dB use atomics), so there both are held against float64.
# FUSEDLORA_TEST_BITWISE=0 makes CPU runs take the CUDA branch too.
BITWISE = not CUDA and os.environ.get("FUSEDLORA_TEST_BITWISE", "1") != "0"


class Rule(NamedTuple):
    u: float              # unit roundoff: storing a value in the format moves it by at most u·|value|
    product: float        # GPU: relative error of one product in a dot of this x dtype with an fp32 operand
    passes: int           # GPU: products accumulated per product (tf32x3 splits each into three dots)
    roundings: int        # R for kernel results: fused plan 1, split plan 2 (as PEFT)
    torch_roundings: int  # R for the op-by-op PyTorch path (torch backend): matmul, bias, dropout, 2 dots, scale, sum
    interpreter: float    # factor on u for Triton stores in the interpreter, whose fp32->bf16 truncates


# Keyed by dtype: u, roundings and interpreter by the dtype a result is stored in (fp32 adapter
# gradients under a bf16 x use the fp32 row); product and passes by x's dtype. Half x: on the GPU
# every dot with S, dU or fp32 adapters runs in tf32x3 (each operand split into two tf32 parts:
# about 3·2^-22 relative per product); bf16·bf16 and fp16·fp16 products are exact in fp32. fp32 x:
# IEEE dots unless torch.backends.cuda.matmul.allow_tf32 (then TF32, as torch.matmul would).
# Elsewhere (CPU, interpreter) every dot is IEEE fp32.
TABLE = {
    torch.float32: Rule(u=2.0**-24, product=2.0**-24, passes=1, roundings=2, torch_roundings=2,
                        interpreter=1.0),
    torch.float16: Rule(u=2.0**-11, product=3 * 2.0**-22, passes=3, roundings=2, torch_roundings=6,
                        interpreter=1.0),
    torch.bfloat16: Rule(u=2.0**-8, product=3 * 2.0**-22, passes=3, roundings=2, torch_roundings=6,
                         interpreter=2.0),
}
TF32 = 2.0**-10  # a product of two operands rounded to tf32's 10-bit mantissa
# F of the norm-wise rule: another implementation's rounding errors are other samples than PyTorch's
# (measured over every whole-model test here, with AVX2 and with scalar CPU kernels: a tensor's error
# reaches at most 1.17 times the run's scale), and the split plan rounds twice.
MODEL_FACTOR = 4.0
# A tensor's noise scale is never taken below this share of the run's worst: in fp32 a gradient's
# error can come from a few roundings upstream, so one correct run's error on it is luck (measured:
# 5.7x PEFT's on one adapter gradient of a mixed batch, 1.7e-6 against 2.9e-7, 0.72 of the run's
# worst; the bound is 4 x 0.25 of it).
RUN_SHARE = 0.25
# The second test, along the tensor, for runs in half precision: the same-dtype run's component times
# SLANT_FACTOR (measured up to 1.9x apart over the bf16 PEFT models), plus SIGMAS standard deviations
# of rounding noise. Not for fp32 runs, whose few dominant roundings upstream can lie along a tensor
# (measured: 8.1e-6 of an 9.1e-6 error) and whose norm-wise bound already catches a 1e-3 scaling.
SLANT_FACTOR = 3.0
SIGMAS = 4.0
# fp32 accumulation; tensor cores truncate instead of rounding in their sums (Fasi, Higham, Mikaitis,
# Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021): twice the unit roundoff there.
ACCUMULATE = TABLE[torch.float32].u * (2 if CUDA else 1)


def chain_lengths(M, K, N, r):
    """n per result: fp32 roundings on the longest path of one term, in any plan. y: the shrink over
    K, its scale, the product with B, then the accumulator that also holds the K base steps and r
    low-rank steps, the masked add, the bias. dx alike over N. dW, db: the reduction over the M rows.
    dA: dU (over N, scaled), then over M; dB: S (over K, scaled), then over M by atomics in any order.
    base (lora_add's): dy itself, at most one rounding."""
    return {"y": 2 * K + r + 4, "x": 2 * N + r + 4, "weight": M + 1, "bias": M + 1,
            "lora_A": N + M + 4, "lora_B": K + M + 4, "base": 1}


def gamma(n, dtype):
    """γ_n for a result of a computation on x of `dtype`: its worst product error plus n additions."""
    if CUDA:
        rule = TABLE[dtype]
        tf32 = dtype == torch.float32 and fp32_matmul_allows_tf32()
        e = (TF32 if tf32 else rule.product) + rule.passes * n * ACCUMULATE
    else:
        e = TABLE[torch.float32].u + n * ACCUMULATE
    return e / (1 - e)


def _storage(dtype, torch_ops):
    """(u_s, R) for a result stored in `dtype`."""
    rule = TABLE[dtype]
    truncates = INTERPRETED and not torch_ops
    return rule.u * (rule.interpreter if truncates else 1.0), rule.torch_roundings if torch_ops else rule.roundings


def assert_oracle(name, got, low, exact, magnitude, n, dtype, torch_ops=False, roundings=None):
    """The componentwise rule. got: the tested result; low: the PyTorch reference in the tested dtypes;
    exact: float64 reference; magnitude: float64 reference on |inputs|; n: chain length
    (chain_lengths); dtype: x's dtype; torch_ops: got comes from the op-by-op PyTorch path; roundings:
    R for a result rounded to storage more often than the table's (None: the table's)."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(exact.shape)}"
    us, R = _storage(got.dtype, torch_ops)
    R = roundings or R
    # The op-by-op path rounds in x's dtype before it casts to fp32 adapters (the dropout of x, the
    # base GEMM): its intermediate roundings are those of the coarser format.
    mid = max(us, TABLE[dtype].u) if torch_ops else us
    magnitude, exact = magnitude.double(), exact.double()
    model = (gamma(n, dtype) + (R - 1) * mid) * magnitude * (1 + mid) ** R + us * exact.abs()
    floor = (low.double() - exact).abs()
    bound = torch.maximum(model, floor)
    err = (got.double() - exact).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the bound; worst error "
            f"{err.max().item():.3e}; first at {i}: got {got[i].item():.8g}, float64 {exact[i].item():.8g}, "
            f"error {err[i].item():.3e} > bound {bound[i].item():.3e} (model {model[i].item():.3e} from "
            f"magnitude {magnitude[i].item():.4g}, n={n}, R={R}, u_s={us:.3g}; same-dtype error "
            f"{floor[i].item():.3e})")


def assert_normwise(got, low, exact, torch_ops=False, where=""):
    """The norm-wise rule, per tensor. got, low (the same-dtype PyTorch run) and exact (float64):
    {name: tensor} with the same names, e.g. the logits and every gradient."""
    assert sorted(got) == sorted(low) == sorted(exact), (sorted(got), sorted(low), sorted(exact))

    def dist(a, b):
        return (a.double() - b.double()).norm().item()

    norms = {n: exact[n].double().norm().item() for n in exact}
    owns = {n: dist(low[n], exact[n]) / norms[n] if norms[n] > 0 else 0.0 for n in exact}
    floor = RUN_SHARE * max(owns.values(), default=0.0)
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in low.values())
    for n in exact:
        assert got[n].shape == exact[n].shape, f"{n}: shape {tuple(got[n].shape)} != {tuple(exact[n].shape)}"
        norm, own = norms[n], owns[n]
        # Rounding noise stays far below this even in bf16 (4e-2 measured); above it, the float64 run
        # computes something else (another dropout mask, other inputs) and would excuse anything.
        assert own < 0.1, f"{n} {where}: the same-dtype run is {own:.2g} off float64: not the same computation"
        us = _storage(got[n].dtype, torch_ops)[0]
        err = dist(got[n], exact[n]) / norm if norm > 0 else dist(got[n], exact[n])
        bound = MODEL_FACTOR * max(own, floor) + us
        assert err <= bound, (
            f"{n} {where}: relative error {err:.3e} exceeds {MODEL_FACTOR:g} × max({own:.3e}, the same-dtype run's "
            f"error on this tensor, {floor:.3e}, {RUN_SHARE:g} of its worst on any) + {us:.3g}; worst element "
            f"{(got[n].double() - exact[n].double()).abs().max().item():.3e}")
        if norm == 0 or not half:
            continue
        # The error's component along the tensor itself: a wrong scaling puts its whole relative error
        # there, rounding noise about 1/sqrt(numel) of its norm (errors of independent signs).
        e = exact[n].double().reshape(-1)

        def along(t):
            return abs(torch.dot(t.double().reshape(-1) - e, e).item()) / norm ** 2

        noise = own / exact[n].numel() ** 0.5
        slant, allowed = along(got[n]), SLANT_FACTOR * (along(low[n]) + SIGMAS * noise) + us
        if os.environ.get("ORACLE_DEBUG"):
            print(f"NORMWISE {where} {n} own {own:.3e} got {err:.3e} ratio {err / max(own, 1e-300):.2f} "
                  f"slant {slant:.3e} allowed {allowed:.3e} sratio {slant / allowed:.2f}")
        assert slant <= allowed, (
            f"{n} {where}: the error along the tensor is {slant:.3e} of it (a scaling off by that much), above "
            f"{SLANT_FACTOR:g} × ({along(low[n]):.3e}, the same-dtype run's, + {SIGMAS:g} × {noise:.3e}, its "
            f"rounding noise's share) + {us:.3g}")


def assert_same(got, want, exact=None, low=None, where=""):
    """got and want ({name: tensor} of two runs over the same inputs, e.g. compiled and eager) equal
    bitwise; or, given exact (the float64 run, where not BITWISE) and low (the same-dtype PyTorch run,
    e.g. under float64_fusedlora in the tested dtypes), each held against exact by the norm-wise rule:
    neither is the other's reference."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    if exact is not None:
        assert low is not None, "a float64 comparison needs the same-dtype PyTorch run as its noise scale"
        assert_normwise(got, low, exact, where=f"{where} (first run)")
        assert_normwise(want, low, exact, where=f"{where} (second run)")
        return
    for n in want:
        assert got[n].shape == want[n].shape, f"{n} {where}: shape {tuple(got[n].shape)} != {tuple(want[n].shape)}"
        bad = got[n] != want[n]
        assert not bad.any(), (f"{n} {where}: {int(bad.sum())} of {bad.numel()} differ, the first at "
                               f"{tuple(bad.nonzero()[0].tolist())}: {got[n][bad][0].item()!r}, "
                               f"expected {want[n][bad][0].item()!r}")


def _keep(x, dropout_p, seed):
    """The mask fusedlora's functions draw: the seed from torch's generator when None (README)."""
    if dropout_p == 0:
        return None
    return fusedlora.dropout_mask(draw_seed() if seed is None else seed, x.shape, dropout_p, x.device)


def _lora_linear64(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, _keep(x, dropout_p, seed), dropout_p)


def _lora_add64(base, x, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    return reference.lora_add(base, x, lora_A, lora_B, scaling, _keep(x, dropout_p, seed), dropout_p)


@contextlib.contextmanager
def float64_fusedlora():
    """fusedlora's functions, wherever fusedlora's modules hold them (LoRALinear, patched PEFT
    layers, AdapterPool), through fusedlora.reference, which takes float64, and float64 let through
    the dtype checks: the float64 run of a model whose layers draw the masks of the run under test
    when torch is seeded alike."""
    stand_ins = [(fusedlora.lora_linear, _lora_linear64), (fusedlora.lora_add, _lora_add64),
                 (fusedlora.multi_lora_linear, reference.multi_lora_linear)]
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "fusedlora" or name.startswith("fusedlora.")):
                continue
            for attr, value in list(vars(module).items()):
                for public, stand_in in stand_ins:
                    if value is public:
                        patch.setattr(module, attr, stand_in)
            if hasattr(module, "FLOAT_DTYPES"):
                patch.setattr(module, "FLOAT_DTYPES", dtypes)
        yield


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, device="cpu", seed=0):
    """Random LoRA inputs scaled so outputs and gradients are of order one. x is (M, K); pass M as a
    tuple for a leading batch shape."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    lead = M if isinstance(M, tuple) else (M,)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    return dict(
        x=rnd(*lead, K),
        weight=rnd(N, K, scale=K ** -0.5),
        bias=rnd(N) if bias else None,
        lora_A=rnd(r, K, scale=K ** -0.5, dt=adapter_dtype),
        lora_B=rnd(N, r, scale=r ** -0.5, dt=adapter_dtype),
    )


NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def run(fn, args, dy, grad, mode="low"):
    """fn(**args) and the gradients of the args named in `grad` for the cotangent dy (None: forward
    only). mode "low": the args as given; "exact": floating-point tensors in float64; "magnitude":
    float64 |tensors|, |float scalars| and |dy|, so every output is the sum of its terms' magnitudes."""
    leaves = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().clone() if mode == "low" else value.detach().double()
            value = value.abs() if mode == "magnitude" else value
            value.requires_grad_(name in grad)
        elif isinstance(value, float) and mode == "magnitude":
            value = abs(value)
        leaves[name] = value
    y = fn(**leaves)
    if dy is not None:
        cot = dy.to(y.dtype) if mode == "low" else dy.double()
        y.backward(cot.abs() if mode == "magnitude" else cot)
    return y.detach(), {n: leaves[n].grad for n in grad}


def reference_run(inputs, scaling, keep, p, dy, dtype64=False, magnitude=False):
    """Output and gradients of fusedlora.reference.lora_linear, in the inputs' dtypes, in float64,
    or (magnitude) in float64 on the absolute values."""
    args = dict(inputs, scaling=scaling, keep_mask=keep, dropout_p=p)
    mode = "magnitude" if magnitude else "exact" if dtype64 else "low"
    return run(reference.lora_linear, args, dy, [n for n in NAMES if inputs[n] is not None], mode)


def _check(fn, args, y, grads, dy, lengths, torch_ops, out="x", roundings=None):
    """The componentwise rule on y and grads; `out`: the argument whose dtype y has; roundings:
    {result name ("y" or an input's): R} where it exceeds the table's."""
    roundings = roundings or {}
    dtype = args["x"].dtype
    names = list(grads or {})
    (y_low, g_low), (y64, g64), (y_mag, g_mag) = (run(fn, args, dy if names else None, names, mode)
                                                  for mode in ("low", "exact", "magnitude"))
    assert y.dtype == args[out].dtype, f"y has dtype {y.dtype}, {out} {args[out].dtype}"
    assert_oracle("y", y, y_low, y64, y_mag, lengths["y"], dtype, torch_ops, roundings.get("y"))
    for n in names:
        assert grads[n].dtype == args[n].dtype, f"d{n} has dtype {grads[n].dtype}, {n} {args[n].dtype}"
        assert_oracle(f"d{n}", grads[n], g_low[n], g64[n], g_mag[n], lengths[n], dtype, torch_ops, roundings.get(n))


def check_lora_linear(y, grads, inputs, scaling, keep, p, dy=None, torch_ops=False):
    """y and grads ({input name: gradient}, any subset; None for none) of lora_linear on `inputs`
    (make_inputs' dict), with keep mask `keep` (None: no dropout) and cotangent dy, by the
    componentwise rule."""
    x, (N, K), r = inputs["x"], inputs["weight"].shape, inputs["lora_A"].shape[0]
    args = dict(inputs, scaling=scaling, keep_mask=keep, dropout_p=p)
    _check(reference.lora_linear, args, y, grads, dy, chain_lengths(x.numel() // max(K, 1), K, N, r), torch_ops)


def check_lora_add(y, grads, inputs, scaling, keep, p, dy=None, torch_ops=False):
    """The same for lora_add; inputs: base, x, lora_A, lora_B (dtype checks against base's dtype)."""
    x, (r, K), N = inputs["x"], inputs["lora_A"].shape, inputs["lora_B"].shape[0]
    args = dict(inputs, scaling=scaling, keep_mask=keep, dropout_p=p)
    _check(reference.lora_add, args, y, grads, dy, chain_lengths(x.numel() // max(K, 1), K, N, r), torch_ops,
           out="base")


def check_multi_lora_linear(y, grads, inputs, ids, dy=None, torch_ops=False):
    """The same for multi_lora_linear; inputs: x, weight, bias, lora_A, lora_B, scalings, ranks."""
    x, (N, K), R = inputs["x"], inputs["weight"].shape, inputs["lora_A"].shape[1]
    args = dict(inputs, adapter_ids=ids)
    _check(reference.multi_lora_linear, args, y, grads, dy, chain_lengths(x.numel() // max(K, 1), K, N, R),
           torch_ops)


def moe_chain_lengths(P, K, N, r, k, gather):
    """chain_lengths for one MoE projection over P (token, expert) pairs (each pair a row of a LoRA
    layer whose expert and adapter are the pair's): y and a pair's dX as the dense layer's; with
    gather, a token's dX sums its k pairs' rows (k more roundings); dW, db, dA and dB reduce over at
    most P rows of one expert or segment."""
    lengths = chain_lengths(P, K, N, r)
    if gather:
        lengths["x"] += k
    return lengths


def check_moe_lora_linear(y, grads, inputs, keep, p, dy, gather, roundings=None, torch_ops=False):
    """The componentwise rule for one MoE projection (fusedlora.reference.moe_lora_linear). inputs: x,
    top_k_index, weight, bias, lora_A, lora_B, scaling, adapter_ids, ranks; y: (P, N) and dy in routing
    order; grads {input name: gradient} with dx (T, K) (gather) or (P, K) in routing order; roundings:
    {result: R} where a plan rounds more often than the table says."""
    x, (E, N, K), R = inputs["x"], inputs["weight"].shape, inputs["lora_A"].shape[2]
    T, k = inputs["top_k_index"].shape
    args = dict(inputs, keep_mask=keep, dropout_p=p, gather=gather)
    _check(reference.moe_lora_linear, args, y, grads, dy, moe_chain_lengths(T * k, K, N, R, k, gather), torch_ops,
           roundings=roundings)
