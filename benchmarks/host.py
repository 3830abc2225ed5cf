"""Host time per eager call: what a small-batch layer costs the CPU before any GPU work.

    python benchmarks/host.py                  the table (Markdown) on stdout
    python benchmarks/host.py --json out.json  the same rows as JSON too
    python benchmarks/host.py --repeats 15     best of 15 (default 7)

At decode sizes a layer's GPU work is a few microseconds, so in eager mode (HF generate, an eval loop,
a small training step) a call costs what the host spends on it. Each row is the best, over --repeats
repeats, of the mean time of --calls back-to-back calls, with the number of kernel launches one call
makes; the no-grad rows run inside one torch.no_grad() region, entered outside the timed calls as
generate() or an eval loop enters it. The unit is a tiny F.linear timed in the same run; ratios are
taken within the run.

Without a GPU (run without TRITON_INTERPRET) every call runs as it would on an H100/H200: the
library takes its Triton path for the CPU tensors, Triton's own argument binder and kernel-cache key
are computed for an sm_90 target wherever the library calls them (the first launch of each
specialization; later ones go straight to the compiled kernel's launcher, as on a GPU, unless
FUSEDLORA_FAST_LAUNCH=0), and only the kernel launch itself is skipped (the
compiled kernel's C launcher, which packs the arguments and calls cuLaunchKernel: ~4-5 µs per launch
on a GPU). No kernel is compiled: the first call of each specialization stores a stand-in kernel in
Triton's cache. Library ops the calls make (addmm_, the base layer's own F.linear) run on the CPU, so
rows that have them use small shapes. With a GPU the calls run for real: host µs is the wall time of
the calls, with a synchronize before and after each repeat (so it is max(host, GPU) per call).
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
SKIPPED = ("the compiled kernel's C launcher (argument packing and cuLaunchKernel); Triton's binder and "
           "cache key for sm_90 run wherever the library calls them")


class Row(NamedTuple):
    name: str
    shape: str
    host_us: float
    launches: int
    library_ops: int
    ratio: float


# ---- a GPU's host path on a CPU ------------------------------------------------------------------

class _Skipped:
    """Stands in Triton's kernel cache for a compiled kernel, one per specialization: everything
    Triton's run() reads from it, and a launch that only counts (and, for tests, records)."""
    function = None
    packed_metadata = None
    launches = 0
    record = None  # a list to append (stand-in, launch arguments) to

    def __init__(self, key):
        self.key = key

    def launch_metadata(self, *args):
        return None  # what CompiledKernel.launch_metadata returns when no launch hook is set

    def run(self, *args):
        _Skipped.launches += 1
        if _Skipped.record is not None:
            _Skipped.record.append((self, args))


class _Sm90Driver:
    """The few driver calls JITFunction.run makes, answered for device 0 of an sm_90 GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def install_sm90_host_path() -> None:
    """Make eager calls on CPU tensors take the GPU's host path (see the module docstring)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("benchmarks/host.py measures Triton's GPU launch path: run it without TRITON_INTERPRET=1")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import fusedlora.core.backend
    import fusedlora.multi

    driver.set_active(_Sm90Driver())

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        stand_in = self.device_caches[device][0][key] = _Skipped(key)
        return stand_in

    JITFunction._do_compile = do_compile
    os.environ["FUSEDLORA_BACKEND"] = "triton"
    # The backend refuses CPU tensors unless the interpreter runs; here the "GPU" is the stand-in.
    fusedlora.core.backend.interpreting = lambda: True
    # Ids' values are checked on CPU tensors but never read back from a GPU (without FUSEDLORA_DEBUG).
    fusedlora.multi.values_checked = lambda t: False


# ---- counting --------------------------------------------------------------------------------------

# Dispatches that allocate or re-view memory and launch nothing on a GPU.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
              "reshape", "t", "transpose", "permute", "expand", "as_strided", "detach", "alias", "slice", "select",
              "unsqueeze", "squeeze", "lift_fresh", "_to_copy_noop", "set_", "resize_"}


def count_launches(fn: Callable) -> (int, int):
    """(Triton launches, library kernels) of one call of fn."""
    from torch.utils._python_dispatch import TorchDispatchMode

    library = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_KERNEL:
                library.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    if CUDA:
        import triton
        counted = []
        hooks = triton.knobs.runtime.launch_enter_hook  # a HookChain on triton 3.6 and 3.9

        def hook(metadata):
            counted.append(1)

        hooks.add(hook)
        try:
            with Count():
                fn()
            torch.cuda.synchronize()
        finally:
            hooks.remove(hook)
        return len(counted), len(library)
    before = _Skipped.launches
    with Count():
        fn()
    return _Skipped.launches - before, len(library)


# Without a GPU the host work is all there is, and the CPU time of this thread measures it without the
# time other processes take from it on a shared machine; with a GPU, wall time (the GPU work overlaps).
_clock = time.perf_counter if CUDA else time.thread_time


def _calls_for(fn: Callable, calls: int) -> int:
    """calls, or (0) as many as fit in about 1 ms: short repeats are less often cut by the scheduler."""
    for _ in range(3):
        fn()
    if calls:
        return calls
    start = time.perf_counter()
    fn()
    return max(3, min(1000, int(1e-3 / (time.perf_counter() - start))))


def host_us(fns: Dict[str, Callable], calls: int, repeats: int) -> Dict[str, float]:
    """name -> best over repeats of the mean wall time of one call, in µs. The repeats go round the
    calls in turn, so a burst of load on a shared machine hits every row alike."""
    counts = {name: _calls_for(fn, calls) for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            n = counts[name]
            if CUDA:
                torch.cuda.synchronize()
            inner = getattr(fn, "inner", None)  # a no-grad call: the region entered once, untimed
            with torch.no_grad() if inner is not None else contextlib.nullcontext():
                body = inner or fn
                start = _clock()
                for _ in range(n):
                    body()
                if CUDA:
                    torch.cuda.synchronize()
                best[name] = min(best[name], (_clock() - start) / n)
    return {name: t * 1e6 for name, t in best.items()}


# ---- the calls -------------------------------------------------------------------------------------

def _peft_layer(d: int, r: int, device, dtype, dropout: float = 0.0, train: bool = False):
    """A PEFT LoRA Linear (d -> d, rank r, bias), adapters initialised non-zero, in eval mode or (train)
    in training mode with its adapters trainable and the base frozen."""
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(d, d)).to(device=device, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False, lora_dropout=dropout)
    peft_model = get_peft_model(model, config)
    peft_model.train(train)
    return peft_model, peft_model.base_model.model[0]


def _pool_layer(d: int, r: int, L: int, M: int, device, dora: bool):
    """(the MultiLoRALinear of an AdapterPool over one nn.Linear(d, d), bf16, with L adapters loaded from
    memory (every other one DoRA when `dora`), an input of M rows, the open `use` block they run in: a
    collected block would close and leave the layer serving the base model)."""
    import fusedlora
    model = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False)).to(device=device, dtype=torch.bfloat16)
    pool = fusedlora.AdapterPool(model, max_adapters=L, max_rank=r, target_modules=["0"], dora=dora)
    g = torch.Generator().manual_seed(1)
    for i in range(L):
        use_dora = dora and i % 2 == 0
        state = {"base_model.model.0.lora_A.weight": torch.randn(r, d, generator=g) / 8,
                 "base_model.model.0.lora_B.weight": torch.randn(d, r, generator=g) / 8}
        if use_dora:
            state["base_model.model.0.lora_magnitude_vector"] = torch.rand(d, generator=g) + 0.5
        pool.load(f"a{i}", state, config=dict(peft_type="LORA", r=r, lora_alpha=2 * r, target_modules=["0"],
                                              use_dora=use_dora))
    block = pool.use([f"a{i % L}" for i in range(M)])
    block.__enter__()  # never left: the process ends with the benchmark (the caller keeps `block` alive)
    x = torch.randn(M, d, generator=g).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        model[0](x)  # the block's AdapterBatch for this shape, made once as in a decode loop
    return model[0], x, block


def cases(device) -> Dict[str, tuple]:
    """name -> (shape label, callable). Built once; each callable is one eager call."""
    import fusedlora
    from fusedlora import AdapterBatch, LoRALinear

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16, grad=False):
        t = (torch.randn(*shape, generator=g) * 0.1).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    out = {}
    M, K, N, r = 16, 4096, 4096, 16
    x, W, b = rand(M, K), rand(N, K), rand(N)
    A, B = rand(r, K), rand(N, r)
    big = f"M={M} K=N={K} r={r} bf16"

    def no_grad(fn):
        """fn as a call without gradients. Timed, it runs inside one torch.no_grad() region entered
        outside the timed calls (`inner`), as a model's layers run inside generate()'s or an eval loop's
        one region: the cost of entering it is not the layer call's."""
        def call():
            with torch.no_grad():
                return fn()
        call.inner = fn
        return call

    out["lora_linear, no grad"] = (big, no_grad(lambda: fusedlora.lora_linear(x, W, b, A, B, 2.0)))
    xg, Ag, Bg, gy = rand(M, K, grad=True), rand(r, K, grad=True), rand(N, r, grad=True), rand(M, N)
    for p in (0.0, 0.1):
        def fwd_bwd(p=p):
            y = fusedlora.lora_linear(xg, W, b, Ag, Bg, 2.0, p)
            return torch.autograd.grad(y, (xg, Ag, Bg), gy)
        out[f"lora_linear, forward+backward, p={p}"] = (big + ", W frozen", fwd_bwd)
    base = rand(M, N)
    out["lora_add, no grad"] = (big, no_grad(lambda: fusedlora.lora_add(base, x, A, B, 2.0)))

    # multi_lora_linear's split plan adds x·Wᵀ with the library GEMM, which runs on the CPU here.
    Mm, d, L = 64, 64 if not CUDA else 4096, 8
    xm, Wm = rand(Mm, d), rand(d, d)
    Am, Bm, s = rand(L, r, d), rand(L, d, r), torch.ones(L, device=device)
    ids = torch.randint(-1, L, (Mm,), generator=g).to(device)
    batch = AdapterBatch(ids, L)
    multi = f"M={Mm} K=N={d} L={L} r={r} bf16"
    out["multi_lora_linear, bare ids"] = (multi, no_grad(lambda: fusedlora.multi_lora_linear(xm, Wm, None, Am, Bm, s, ids)))
    out["multi_lora_linear, AdapterBatch"] = (multi, no_grad(
        lambda: fusedlora.multi_lora_linear(xm, Wm, None, Am, Bm, s, batch)))
    xmg, Amg, Bmg, gym = rand(Mm, d, grad=True), rand(L, r, d, grad=True), rand(L, d, r, grad=True), rand(Mm, d)

    def multi_fwd_bwd():
        y = fusedlora.multi_lora_linear(xmg, Wm, None, Amg, Bmg, s, batch)
        return torch.autograd.grad(y, (xmg, Amg, Bmg), gym)
    out["multi_lora_linear, forward+backward, AdapterBatch"] = (multi + ", W frozen", multi_fwd_bwd)

    # DoRA: the row norms take library ops (W's row norms, A·Aᵀ), which run on the CPU here: a small width.
    dd = 64 if not CUDA else 4096
    xd, Wd, bd, Ad, Bd = rand(M, dd), rand(dd, dd), rand(dd), rand(r, dd), rand(dd, r)
    md = rand(dd) + 1.0
    dora = f"M={M} K=N={dd} r={r} bf16"
    out["dora_linear, no grad"] = (dora, no_grad(lambda: fusedlora.dora_linear(xd, Wd, bd, Ad, Bd, md, 2.0)))
    xdg, Adg, Bdg, gyd = rand(M, dd, grad=True), rand(r, dd, grad=True), rand(dd, r, grad=True), rand(M, dd)
    mdg = (rand(dd) + 1.0).requires_grad_()

    def dora_fwd_bwd():
        y = fusedlora.dora_linear(xdg, Wd, bd, Adg, Bdg, mdg, 2.0)
        return torch.autograd.grad(y, (xdg, Adg, Bdg, mdg), gyd)
    out["dora_linear, forward+backward"] = (dora + ", W frozen", dora_fwd_bwd)
    col_scale = torch.ones(L, d, device=device)
    out["multi_lora_linear, AdapterBatch, col_scale"] = (multi, no_grad(
        lambda: fusedlora.multi_lora_linear(xm, Wm, None, Am, Bm, s, batch, col_scale=col_scale)))
    # A pool's layer in a `use` block, plain and with DoRA slots (whose forward first compares the
    # version counters its scales were computed from). The block is entered here and left open: the
    # timed calls are a decode step's layer calls, not the block's entry.
    for dora in (False, True):
        layer, pool_x, block = _pool_layer(d, r, L, Mm, device, dora)
        out[f"AdapterPool layer, dora={dora}"] = (multi + (", 4 DoRA slots" if dora else ""), no_grad(
            lambda layer=layer, pool_x=pool_x, block=block: layer(pool_x)))

    # Layers against the same layer unpatched: the base layer runs its own F.linear there (on the CPU
    # here), so these use a small width.
    dl, Ml = 64 if not CUDA else 4096, 16
    xl = rand(Ml, dl, dtype=torch.float32)
    layer_shape = f"M={Ml} d={dl} r={r} fp32"
    peft_model, peft_linear = _peft_layer(dl, r, device, torch.float32)
    out["PEFT LoRA Linear, unpatched"] = (layer_shape, no_grad(lambda: peft_linear(xl)))
    patched_model, patched_linear = _peft_layer(dl, r, device, torch.float32)
    fusedlora.patch_peft(patched_model)
    out["PEFT LoRA Linear, patch_peft"] = (layer_shape, no_grad(lambda: patched_linear(xl)))
    # A training step's layer call: forward and backward, adapters trainable, dropout 0.1, x needing a
    # gradient as every layer's input but the first does.
    xt, gyt = rand(Ml, dl, dtype=torch.float32, grad=True), rand(Ml, dl, dtype=torch.float32)
    for name, patch in (("unpatched", False), ("patch_peft", True)):
        model, layer = _peft_layer(dl, r, device, torch.float32, dropout=0.1, train=True)
        if patch:
            fusedlora.patch_peft(model)
        params = [xt] + [q for q in layer.parameters() if q.requires_grad]
        out[f"PEFT LoRA Linear, forward+backward, {name}"] = (
            layer_shape + ", p=0.1", lambda layer=layer, params=params: torch.autograd.grad(layer(xt), params, gyt))

    linear = torch.nn.Linear(dl, dl).to(device)
    lora_a = torch.nn.Linear(dl, r, bias=False).to(device)
    lora_b = torch.nn.Linear(r, dl, bias=False).to(device)
    dropout = torch.nn.Dropout(0.0)
    out["nn.Linear + unfused LoRA (PEFT-style)"] = (layer_shape, no_grad(
        lambda: linear(xl) + lora_b(lora_a(dropout(xl))) * 2.0))
    module = LoRALinear(torch.nn.Linear(dl, dl).to(device), r=r, lora_alpha=2 * r, init_lora_weights=False).eval()
    out["LoRALinear"] = (layer_shape, no_grad(lambda: module(xl)))
    return out


def run(repeats: int = 7, calls: int = 0, only: List[str] = None) -> dict:
    if not CUDA:
        install_sm90_host_path()
        # The library ops of these calls would be GPU launches: no intra-op threads (whose spin-waits
        # dominate on a busy CPU) for the tiny CPU stand-ins.
        torch.set_num_threads(1)
    device = "cuda" if CUDA else "cpu"
    tiny_x, tiny_w = torch.randn(1, 8, device=device), torch.randn(8, 8, device=device)

    def unit():
        return F.linear(tiny_x, tiny_w)

    built = {name: case for name, case in cases(device).items() if not only or any(o in name for o in only)}
    counts = {name: count_launches(fn) for name, (_, fn) in built.items()}
    times = host_us({"unit": unit, **{name: fn for name, (_, fn) in built.items()}}, calls, repeats)
    unit_us = times["unit"]
    rows = [Row(name, shape, times[name], *counts[name], times[name] / unit_us) for name, (shape, _) in built.items()]
    import triton
    return dict(
        mode="gpu" if CUDA else "cpu, sm_90 host path",
        skipped=None if CUDA else SKIPPED,
        timing="wall time of back-to-back calls, synchronize around each repeat" if CUDA else "thread CPU time",
        device=torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        fast_launch=os.environ.get("FUSEDLORA_FAST_LAUNCH", "default"),
        load=os.getloadavg(), repeats=repeats, calls=calls,
        unit=dict(name=f"F.linear (1, 8)x(8, 8) on {device}", host_us=unit_us),
        rows=[r._asdict() for r in rows])


def markdown(result: dict) -> str:
    lines = [f"Host time per eager call ({result['mode']}; torch {result['torch']}, triton {result['triton']}, "
             f"{result['timing']}, best of {result['repeats']} repeats, load {result['load'][0]:.2f}).",
             f"Unit: {result['unit']['name']}, {result['unit']['host_us']:.2f} µs."]
    if result["skipped"]:
        lines.append(f"Skipped per launch: {result['skipped']}.")
    lines += ["", "| call | shape | host µs | Triton launches | library ops | × unit |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['shape']} | {r['host_us']:.1f} | {r['launches']} | {r['library_ops']} "
                     f"| {r['ratio']:.1f} |")
    by = {r["name"]: r["host_us"] for r in result["rows"]}
    for patched, plain in (("PEFT LoRA Linear, patch_peft", "PEFT LoRA Linear, unpatched"),
                           ("PEFT LoRA Linear, forward+backward, patch_peft",
                            "PEFT LoRA Linear, forward+backward, unpatched"),
                           ("LoRALinear", "nn.Linear + unfused LoRA (PEFT-style)")):
        if patched in by and plain in by:
            lines.append(f"\n{patched} / {plain}: {by[patched] / by[plain]:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=0, help="calls per repeat (default: about 1 ms of them)")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.repeats, args.calls, args.only)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
