"""What the benchmark runs: a stack of LoRA layers, and one callable per provider over the same inputs.

A stack has `depth` layers alternating K→N and N→K (depth 1 is one projection), a frozen base weight,
adapters lora_A (r, k) and lora_B (n, r) in the row's dtype, scaling 2 and dropout p on x. Providers:
- base:      the base GEMMs alone through torch.matmul (cuBLAS): the floor. With backward, the
             forward plus the dX GEMM (the base weight is frozen).
- peft:      a real PEFT model: nn.Linear layers wrapped by peft.get_peft_model, its adapters set to
             the same A and B (autocast_adapter_dtype=False, so they stay in the row's dtype).
- addmm:     matmul, then the low-rank term added in place with addmm_ (dropout copy of x if p > 0).
- compile:   torch.compile of fusedlora.reference.lora_linear over the stack, keep-mask from
             torch.rand; compiled once per stack, outside any timed region.
- fusedlora: fusedlora.lora_linear per layer, each call on the plan the planner picks for its shape;
             fusedlora[fused] and fusedlora[split] force one plan (suite.py sets FUSEDLORA_PLAN).
Inputs are random normal (never zeros) and rotate among several copies of x so that small shapes
are not timed out of L2. With backward each call returns the gradients for x, every lora_A and
every lora_B through torch.autograd.grad (nothing accumulates in .grad between calls).
"""
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from fusedlora.core import reference

L2_FLUSH_BYTES = 256 << 20  # rotate inputs until this many bytes are in flight: several times any L2
MIB = float(2**20)
PROVIDERS = ("base", "peft", "addmm", "compile", "fusedlora", "fusedlora[fused]", "fusedlora[split]")
# The norm-wise rule of tests/oracle.py (benchmarks import nothing from tests): a provider's output
# and gradients share one rounding-noise scale, the worst relative error the same-dtype PyTorch
# reference reaches on any of them. A correct provider stays within MODEL_FACTOR times that (its
# rounding errors are other samples than the reference's, and the split plan rounds twice: the
# low-rank term, then the library GEMM's sum onto it), plus one rounding of the output.
MODEL_FACTOR = 2.0


def norm_tolerance(low_rel_err: float, dtype: torch.dtype) -> float:
    """The bound on a provider's worst relative error, given the same-dtype reference's worst."""
    return MODEL_FACTOR * low_rel_err + torch.finfo(dtype).eps / 2


def reference_stack(x, weights, lora_As, lora_Bs, scaling, p):
    """The stack through the plain-torch reference; with p > 0 each layer draws its keep-mask with
    torch.rand (fp32, so that the keep probability is not quantised to bf16's 8 bits)."""
    for weight, lora_A, lora_B in zip(weights, lora_As, lora_Bs):
        keep = torch.rand(x.shape, device=x.device) >= p if p > 0 else None
        x = reference.lora_linear(x, weight, None, lora_A, lora_B, scaling, keep, p)
    return x


def base_stack(x, weights):
    for weight in weights:
        x = torch.matmul(x, weight.t())
    return x


def addmm_stack(x, weights, lora_As, lora_Bs, scaling, p):
    """matmul, then addmm_ of the low-rank term into its output: the in-place add is safe for autograd
    because mm saves its inputs, not its output."""
    for weight, lora_A, lora_B in zip(weights, lora_As, lora_Bs):
        dropped = nn.functional.dropout(x, p) if p > 0 else x
        y = torch.matmul(x, weight.t())
        x = y.addmm_(torch.matmul(dropped, lora_A.t()), lora_B.t(), alpha=scaling)
    return x


def fused_stack(x, weights, lora_As, lora_Bs, scaling, p):
    for weight, lora_A, lora_B in zip(weights, lora_As, lora_Bs):
        x = fusedlora.lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p=p)
    return x


def peft_stack(weights, lora_As, lora_Bs, scaling, p):
    """nn.Sequential of nn.Linear layers turned into PEFT LoRA Linear layers by get_peft_model (the
    model is modified in place), with the given base weights and adapters."""
    r = lora_As[0].shape[0]
    model = nn.Sequential(*(nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                            for w in weights))
    config = peft.LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=p,
                             target_modules=[str(i) for i in range(len(weights))])
    peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for layer, weight, lora_A, lora_B in zip(model, weights, lora_As, lora_Bs):
            layer.base_layer.weight.copy_(weight)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
            layer.scaling["default"] = scaling  # exact, whatever lora_alpha / r rounds to
    return model


def _rel_err(pairs):
    """Worst ‖got − exact‖ / ‖exact‖ over (got, exact) pairs, in float64."""
    return max(((got.double() - exact).norm() / exact.norm()).item() for got, exact in pairs)


class LayerStack:
    """One row's inputs and providers. Every case builder returns this interface (suite.py uses it):
    providers (name -> zero-argument callable, the timed region), check(name) -> relative error
    against float64, tolerance, saved_mb(name), flops(name)."""

    def __init__(self, M, K, N, r, dtype, device, depth=1, backward=False, dropout_p=0.0, scaling=2.0,
                 rotate=True):
        self.M, self.r, self.dtype, self.scaling = M, r, dtype, scaling
        self.backward, self.p = backward, dropout_p
        self.dims = [(K, N) if i % 2 == 0 else (N, K) for i in range(depth)]
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0, grad=False):
            t = torch.randn(*shape, generator=gen) * scale
            return t.to(device=device, dtype=dtype).requires_grad_(grad)

        self.weights = [rnd(n, k, scale=k ** -0.5) for k, n in self.dims]
        self.lora_A = [rnd(r, k, scale=k ** -0.5, grad=backward) for k, n in self.dims]
        self.lora_B = [rnd(n, r, scale=r ** -0.5, grad=backward) for k, n in self.dims]
        x_bytes = M * K * dtype.itemsize
        copies = max(1, min(16, L2_FLUSH_BYTES // max(x_bytes, 1))) if rotate else 1
        self.xs = [rnd(M, K, grad=backward) for _ in range(copies)]
        self.dy = rnd(M, self.dims[-1][1])
        self.peft_model = peft_stack(self.weights, self.lora_A, self.lora_B, scaling, dropout_p)
        # One compiled function per stack: shapes are static (dynamic=False, as a user compiling one
        # model gets), and a reset keeps earlier rows' graphs from counting against the recompile limit.
        torch.compiler.reset()
        compiled = torch.compile(reference_stack, dynamic=False)
        lora = (self.weights, self.lora_A, self.lora_B, scaling)
        self.forwards = {
            "base": lambda x, p: base_stack(x, self.weights),
            "peft": lambda x, p: self.peft_model(x),
            "addmm": lambda x, p: addmm_stack(x, *lora, p),
            "compile": lambda x, p: compiled(x, *lora, p),
            "fusedlora": lambda x, p: fused_stack(x, *lora, p),
        }
        for plan in ("fused", "split"):
            self.forwards[f"fusedlora[{plan}]"] = self.forwards["fusedlora"]
        nxt = itertools.cycle(self.xs).__next__
        self.providers = {name: (lambda name=name: self.call(name, nxt(), self.p)) for name in PROVIDERS}

    def leaves(self, name, x):
        """What backward differentiates: x, then every lora_A, then every lora_B (PEFT's own copies)."""
        if name == "base":
            return [x]
        if name == "peft":
            return ([x] + [layer.lora_A["default"].weight for layer in self.peft_model]
                    + [layer.lora_B["default"].weight for layer in self.peft_model])
        return [x, *self.lora_A, *self.lora_B]

    def call(self, name, x, p):
        """Forward only (under no_grad, as in serving), or forward and the gradients of leaves()."""
        if not self.backward:
            with torch.no_grad():
                return [self.forwards[name](x, p)]
        y = self.forwards[name](x, p)
        return [y, *torch.autograd.grad(y, self.leaves(name, x), self.dy)]

    def _exact(self, dtype):
        """(LoRA outputs, base outputs) of the plain-torch reference in `dtype`, dropout off: the
        output, then the gradients in leaves() order when the case has a backward."""
        def leaf(t):
            return t.detach().to(dtype).requires_grad_(self.backward)

        x, lora_A, lora_B = leaf(self.xs[0]), [leaf(a) for a in self.lora_A], [leaf(b) for b in self.lora_B]
        weights = [w.to(dtype) for w in self.weights]
        y = reference_stack(x, weights, lora_A, lora_B, self.scaling, 0.0)
        y_base = base_stack(x, weights)
        if not self.backward:
            return [y.detach()], [y_base.detach()]
        dy = self.dy.to(dtype)
        return ([y.detach(), *torch.autograd.grad(y, [x, *lora_A, *lora_B], dy)],
                [y_base.detach(), *torch.autograd.grad(y_base, [x], dy)])

    @functools.cached_property
    def _float64(self):
        return self._exact(torch.float64)

    def check(self, name):
        """Worst relative error of the provider's output and gradients against float64, dropout off."""
        self.peft_model.eval()  # PEFT's dropout modules follow the module mode
        try:
            got = self.call(name, self.xs[0], 0.0)
        finally:
            self.peft_model.train()
        return _rel_err(zip(got, self._float64[1 if name == "base" else 0]))

    @functools.cached_property
    def tolerance(self):
        """norm_tolerance of the same-dtype reference's worst relative error over the output and the
        gradients (the worst tensor sets the scale: one tensor's error alone is a noisy sample)."""
        low = self._exact(self.dtype)[0]
        return norm_tolerance(_rel_err(zip(low, self._float64[0])), self.dtype)

    def saved_mb(self, name):
        """MiB autograd holds for backward after one training forward (dropout on), the parameters
        and the input excluded: they stay in memory whatever the provider. None for a forward-only
        case."""
        if not self.backward:
            return None
        held = [*self.xs, *self.weights, *self.lora_A, *self.lora_B, *self.peft_model.parameters()]
        return saved_mib(lambda: self.forwards[name](self.xs[0], self.p), held)

    def flops(self, name):
        """Floating-point operations of the work asked of the provider (base: the GEMMs alone)."""
        total = 0
        for k, n in self.dims:
            gemm, low_rank = 2 * self.M * n * k, 2 * self.M * self.r * (k + n)
            if not self.backward:
                total += gemm + (0 if name == "base" else low_rank)
            else:
                # backward: dX = dY·W plus dS = dY·B, dB = dYᵀ·S, dS·A into dX, dA = dSᵀ·x
                total += 2 * gemm + (0 if name == "base" else 3 * low_rank)
        return total


def layer_stack(case, spec, device, rotate=True):
    """Case builder for fwd, fwd_bwd and train_mem: a LayerStack of the case's depth and dropout."""
    return LayerStack(spec.M, spec.K, spec.N, spec.r, spec.torch_dtype, device, depth=case.depth,
                      backward=case.backward, dropout_p=case.dropout_p, rotate=rotate)


def saved_mib(forward, held):
    """MiB of the distinct storages autograd saves for backward while `forward()` runs, the storages
    of the tensors in `held` (parameters, inputs: in memory whatever the provider) excluded."""
    held = {t.untyped_storage().data_ptr() for t in held}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values()) / MIB
