"""The multi-adapter cases: one batch in which every token uses one of L adapters.

multi_fwd (serving: forward only, under no_grad; ids drawn uniformly). Providers, all over the same
inputs (x: (M, K), L adapters of rank r stacked as (L, r, K) and (L, N, r)):
- base:              the base GEMM alone through torch.matmul: the floor.
- peft:              a real PEFT LoRA Linear holding the L adapters, called with adapter_names=
                     (PEFT's mixed-batch inference: a loop over the adapters present).
- bmm:               gather each token's adapter, then batched matmuls (what a serving engineer writes
                     in an afternoon).
- fusedlora_unfused: the base GEMM, then fusedlora's segment shrink and an expand adding into its
                     output (the Punica/vLLM structure).
- fusedlora:         fusedlora.multi_lora_linear over bare ids, on the plan the planner picks;
                     fusedlora[fused] and fusedlora[split] force a plan (suite.py sets FUSEDLORA_PLAN).
- fusedlora_batch:   the same over an AdapterBatch built outside the timed call, as a model's layers
                     share one per step (AdapterPool.use): the per-layer cost without the grouping.
- base_graph, bmm_graph, fusedlora_graph: base, bmm and fusedlora replayed from CUDA graphs (one per
                     rotated input, captured when the row is built): GPU time without launch gaps.
                     Off CUDA, the eager call.
multi_fwd_bwd (several adapters trained in one batch, LoRAFusion's multi-job setting: each job's rows
contiguous, L jobs of M/L rows; forward, then the gradients of x and of the stacked lora_A and lora_B):
- base:      the base GEMM and its dX GEMM (the base weight is frozen): the floor.
- loop:      one job after another: its rows' base GEMM, then its own low-rank term added in place.
- bmm:       gather and batched matmuls, differentiated by autograd.
- fusedlora, fusedlora[fused], fusedlora[split]: multi_lora_linear over the batch's ids.
"""
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from fusedlora.core import reference
from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.kernels.multi_lora import multi_gemm, multi_shrink
from providers import norm_tolerance, saved_mib

L2_FLUSH_BYTES = 256 << 20
FWD_PROVIDERS = ("base", "peft", "bmm", "fusedlora_unfused", "fusedlora", "fusedlora[fused]", "fusedlora[split]",
                 "fusedlora_batch", "base_graph", "bmm_graph", "fusedlora_graph")
FWD_BWD_PROVIDERS = ("base", "loop", "bmm", "fusedlora", "fusedlora[fused]", "fusedlora[split]")
PROVIDERS = {"multi_fwd": FWD_PROVIDERS, "multi_fwd_bwd": FWD_BWD_PROVIDERS}


def multi_lora_linear_unfused(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks=None):
    """Forward only, the Punica/vLLM structure: y = x·Wᵀ + b by the library GEMM, then fusedlora's segment
    shrink over tokens grouped by adapter and an expand that adds into y. Shapes as
    fusedlora.multi_lora_linear; adapter_ids: ids or an AdapterBatch; inputs the benchmark made (the
    ids' values are checked when the batch is built, shapes are not)."""
    batch = adapter_ids if isinstance(adapter_ids, AdapterBatch) else AdapterBatch(adapter_ids, lora_A.shape[0])
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    y = torch.nn.functional.linear(x2, weight, bias)
    groups = batch.groups()
    S = multi_shrink(x2, lora_A, scalings, groups, ranks)
    return multi_gemm(None, None, None, S, lora_B, groups, ranks, y, accumulate=True).reshape(*x.shape[:-1], N)


def peft_layer(weight, lora_A, lora_B, scalings):
    """A PEFT LoRA Linear over `weight` with adapters "a0".."a{L-1}" set to the given stacks."""
    L, r, K = lora_A.shape
    model = nn.Sequential(nn.Linear(K, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype))
    for i in range(L):
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"])
        if i == 0:
            peft.get_peft_model(model, config, adapter_name="a0", autocast_adapter_dtype=False)
        else:
            model[0].update_layer(f"a{i}", r, lora_alpha=r, config=config)
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        for i in range(L):
            layer.lora_A[f"a{i}"].weight.copy_(lora_A[i])
            layer.lora_B[f"a{i}"].weight.copy_(lora_B[i])
            layer.scaling[f"a{i}"] = float(scalings[i])
    return layer.to(weight.dtype).eval()


def bmm_forward(x, weight, lora_A, lora_B, scalings, ids):
    """Every token's adapter gathered, then two batched matmuls: memory M·r·(K + N)."""
    u = torch.bmm(lora_A[ids], x.unsqueeze(2))                  # (M, r, 1)
    low_rank = torch.bmm(lora_B[ids], u).squeeze(2)             # (M, N)
    return x @ weight.t() + low_rank * scalings[ids, None].to(x.dtype)


def loop_forward(x, weight, lora_A, lora_B, scalings, bounds):
    """One job at a time over contiguous rows [bounds[j], bounds[j + 1]): the job's base GEMM, then its
    low-rank term added in place (addmm_ on the matmul's output: mm saves its inputs, not its output)."""
    outs = []
    for j, scaling in enumerate(scalings):
        xj = x[bounds[j]:bounds[j + 1]]
        outs.append((xj @ weight.t()).addmm_(xj @ lora_A[j].t(), lora_B[j].t(), alpha=scaling))
    return torch.cat(outs)


def graphed(fn, inputs):
    """fn(x, ids) replayed from one CUDA graph per (x, ids) of `inputs`, captured now (after a warm-up
    call on a side stream compiles the kernels). The graphs share one memory pool: each output stays
    alive, and the intermediates of one replay are dead before the next starts on the same stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for x, ids in inputs:
            fn(x, ids)
    torch.cuda.current_stream().wait_stream(side)
    pool, graphs = torch.cuda.graph_pool_handle(), {}
    for x, ids in inputs:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            out = fn(x, ids)
        graphs[id(x)] = graph, out

    def replay(x, ids):
        graph, out = graphs[id(x)]
        graph.replay()
        return out

    return replay


def _rel_err(pairs):
    """Worst ‖got − exact‖ / ‖exact‖ over (got, exact) pairs, in float64."""
    return max(((got.double() - exact).norm() / exact.norm()).item() for got, exact in pairs)


class MultiBatch:
    """One multi_fwd or multi_fwd_bwd row; the interface of providers.LayerStack (suite.py uses it)."""

    def __init__(self, M, K, N, r, L, dtype, device, rotate=True, backward=False):
        self.M, self.K, self.N, self.r, self.L, self.dtype = M, K, N, r, L, dtype
        self.backward = backward
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0, grad=False):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

        self.weight = rnd(N, K, scale=K ** -0.5)
        self.lora_A = rnd(L, r, K, scale=K ** -0.5, grad=backward)
        self.lora_B = rnd(L, N, r, scale=r ** -0.5, grad=backward)
        self.scalings = (torch.rand(L, generator=gen) + 0.5).to(device)
        copies = max(1, min(16, L2_FLUSH_BYTES // max(M * K * dtype.itemsize, 1))) if rotate else 1
        if backward:  # L jobs, each a contiguous run of rows
            self.bounds = [j * M // L for j in range(L + 1)]
            runs = torch.repeat_interleave(torch.arange(L), torch.tensor(self.bounds).diff())
            self.inputs = [(rnd(M, K, grad=True), runs.to(device)) for _ in range(copies)]
            self.dy = rnd(M, N)
        else:
            self.inputs = [(rnd(M, K), torch.randint(0, L, (M,), generator=gen).to(device)) for _ in range(copies)]
        stacks = (self.lora_A, self.lora_B, self.scalings)
        self.forwards = {
            "base": lambda x, ids: x @ self.weight.t(),
            "bmm": lambda x, ids: bmm_forward(x, self.weight, *stacks, ids),
            "fusedlora": lambda x, ids: fusedlora.multi_lora_linear(x, self.weight, None, *stacks, ids),
        }
        for plan in ("fused", "split"):
            self.forwards[f"fusedlora[{plan}]"] = self.forwards["fusedlora"]
        if backward:
            scales = self.scalings.tolist()
            self.forwards["loop"] = lambda x, ids: loop_forward(x, self.weight, self.lora_A, self.lora_B, scales,
                                                                self.bounds)
        else:
            self._add_serving_providers(device, stacks)
        nxt = itertools.cycle(self.inputs).__next__
        self.providers = {name: (lambda name=name: self.call(name, *nxt())) for name in PROVIDERS[self.case]}

    @property
    def case(self):
        return "multi_fwd_bwd" if self.backward else "multi_fwd"

    def _add_serving_providers(self, device, stacks):
        self.peft_layer = peft_layer(self.weight, self.lora_A, self.lora_B, self.scalings)
        names = {id(ids): [f"a{i}" for i in ids.tolist()] for _, ids in self.inputs}
        batches = {id(ids): fusedlora.AdapterBatch(ids, self.L) for _, ids in self.inputs}
        self.forwards.update({
            "peft": lambda x, ids: self.peft_layer(x, adapter_names=names[id(ids)]),
            "fusedlora_unfused": lambda x, ids: multi_lora_linear_unfused(x, self.weight, None, *stacks, ids),
            "fusedlora_batch": lambda x, ids: fusedlora.multi_lora_linear(x, self.weight, None, *stacks,
                                                                          batches[id(ids)]),
        })
        for name in ("base", "bmm", "fusedlora"):
            fn = self.forwards[name]
            self.forwards[f"{name}_graph"] = graphed(fn, self.inputs) if torch.device(device).type == "cuda" else fn

    def leaves(self, name, x):
        """What backward differentiates: x, then the stacked lora_A and lora_B (x alone for base)."""
        return [x] if name == "base" else [x, self.lora_A, self.lora_B]

    def call(self, name, x, ids):
        """Forward only (under no_grad, as in serving), or forward and the gradients of leaves()."""
        if not self.backward:
            with torch.no_grad():
                return [self.forwards[name](x, ids)]
        y = self.forwards[name](x, ids)
        return [y, *torch.autograd.grad(y, self.leaves(name, x), self.dy)]

    def _exact(self, dtype, base=False):
        """The plain-torch reference in `dtype`: the output, then with backward the gradients in
        leaves() order."""
        def leaf(t):
            return t.detach().to(dtype).requires_grad_(self.backward)

        x, ids = self.inputs[0]
        x, A, B = leaf(x), leaf(self.lora_A), leaf(self.lora_B)
        weight = self.weight.detach().to(dtype)
        if base:
            y = x @ weight.t()
        else:
            y = reference.multi_lora_linear(x, weight, None, A, B, self.scalings.to(dtype), ids)
        if not self.backward:
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, [x] if base else [x, A, B], self.dy.to(dtype))]

    @functools.cached_property
    def _float64(self):
        return self._exact(torch.float64)

    def check(self, name):
        """Worst relative error of the provider's output (and gradients) against float64."""
        got = self.call(name, *self.inputs[0])
        exact = self._exact(torch.float64, base=True) if name.startswith("base") else self._float64
        return _rel_err(zip(got, exact))

    @functools.cached_property
    def tolerance(self):
        """providers.norm_tolerance of the same-dtype reference's worst relative error (output and, with
        backward, every gradient)."""
        return norm_tolerance(_rel_err(zip(self._exact(self.dtype), self._float64)), self.dtype)

    def saved_mb(self, name):
        """MiB autograd holds for backward after one forward, the parameters and the inputs
        excluded; None for a forward-only case."""
        if not self.backward:
            return None
        held = [*(t for pair in self.inputs for t in pair), self.weight, self.lora_A, self.lora_B, self.scalings]
        return saved_mib(lambda: self.forwards[name](*self.inputs[0]), held)

    def flops(self, name):
        gemm, low_rank = 2 * self.M * self.N * self.K, 2 * self.M * self.r * (self.K + self.N)
        if not self.backward:
            return gemm if name.startswith("base") else gemm + low_rank
        # backward: dX = dY·W, plus dU = dY·B, dB = dYᵀ·S, dU·A into dX and dA = dUᵀ·x
        return 2 * gemm if name == "base" else 2 * gemm + 3 * low_rank


def multi_batch(case, spec, device, rotate=True):
    """Case builder for multi_fwd and multi_fwd_bwd."""
    return MultiBatch(spec.M, spec.K, spec.N, spec.r, spec.adapters, spec.torch_dtype, device, rotate=rotate,
                      backward=case.backward)
