"""The case table, the grids, and the loop that checks, times and measures every provider of a row.

A case is a builder and the grid it runs on: a builder returns an object with the interface of
providers.LayerStack (multi_providers.MultiBatch is the other one), and CASES names the grid.
Rows of one comparison share (case, M, K, N, dtype): the base provider runs once per such group and
every other row's ratio_to_base is taken against it.
"""
import contextlib
import dataclasses
import datetime
import itertools
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.testing  # noqa: F401  (do_bench; not every triton imports it with the package)

from fusedlora.core import knobs
from fusedlora.plans import planner

from dora_providers import dora_bench
from moe_providers import SAVED_SHARE as MOE_SAVED_SHARE, moe_bench
from multi_providers import multi_batch
from providers import layer_stack
from qlora_providers import missing as bitsandbytes_missing, qlora_bench
from report import fmt, mib

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The row schema, in its order (docs/benchmarks.md, "Output files"); the extra keys follow it.
ROW_KEYS = ("case", "provider", "M", "K", "N", "r", "dtype", "adapters", "ms", "tflops", "ratio_to_base",
            "peak_mb")
EXTRA_KEYS = ("saved_mb", "rel_err", "host_us")
HEADER_KEYS = ("gpu", "torch", "triton", "commit", "date")
CPU_NAME = "none (CPU, Triton interpreter)"

# Real projections (K, N): 8B-class (hidden 4096, MLP 14336) and 70B-class (8192, 28672) models.
SHAPES_8B = [(4096, 4096), (4096, 14336), (14336, 4096)]
SHAPES_70B = [(8192, 8192), (8192, 28672)]
GRIDS = {
    "headline": dict(shapes=[(4096, 4096), (4096, 14336)], ms=[16, 8192], ranks=[16], adapters=[1]),
    "full": dict(shapes=SHAPES_8B + SHAPES_70B, ms=[1, 16, 64, 256, 2048, 4096, 8192, 16384],
                 ranks=[8, 16, 64, 128], adapters=[1]),
}
FP16_SUBSET = dict(shapes=[(4096, 4096)], ranks=[16])  # --full adds fp16 rows here
# --plans: where the single-adapter planner should switch from the fused to the split plan
# (fusedlora/plans/planner.py SPLIT_FROM_M), measured between the decode sizes and the compute-bound ones.
# Only these cases and providers run: the rest of a headline row says nothing about the crossover.
PLANS_GRID = dict(shapes=[(4096, 4096), (4096, 14336)], ms=[16, 32, 64, 128, 256, 512, 1024, 2048],
                  ranks=[16], adapters=[1])
PLANS_CASES = ("fwd", "fwd_bwd")
PLANS_PROVIDERS = ("base", "addmm", "fusedlora", "fusedlora[fused]", "fusedlora[split]")
# Without a GPU: tiny shapes through the interpreter, edges that fit no block included (M, K, N, r, dtype).
CPU_GRID = [(37, 70, 45, 3, "fp32"), (64, 128, 96, 16, "bf16")]


class Spec(NamedTuple):
    case: str
    M: int
    K: int
    N: int
    r: int
    dtype: str
    adapters: int = 1

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def group(self):
        """The rows that share one base measurement."""
        return (self.case, self.M, self.K, self.N, self.dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable  # (case, spec, device, rotate) -> object with LayerStack's interface
    depth: int = 1
    backward: bool = False
    dropout_p: float = 0.0
    grids: dict = dataclasses.field(default_factory=dict)  # per size, overrides of GRIDS[size]
    missing: Callable = lambda: None  # () -> why the case cannot run here (an optional package), or None


CASES = {
    "fwd": Case(build=layer_stack),
    "fwd_bwd": Case(build=layer_stack, backward=True),
    # Training memory: four layers alternating K→N and N→K, fwd+bwd with dropout 0.1.
    "train_mem": Case(build=layer_stack, depth=4, backward=True, dropout_p=0.1,
                      grids={"headline": dict(shapes=[(4096, 4096)], ms=[8192]),
                             "full": dict(ms=[2048, 8192], ranks=[16, 64])}),
    # Multi-tenant serving: every token one of `adapters` adapters, drawn uniformly. The headline rows
    # are the serving targets: 64 adapters at M=4096 (prefill) and at M=64 (decode, nearly every token
    # its own adapter). bmm gathers M·r·(K+N) adapter elements, which bounds the full grid's M.
    "multi_fwd": Case(build=multi_batch,
                      grids={"headline": dict(shapes=[(4096, 4096)], ms=[64, 4096], adapters=[64]),
                             "full": dict(ms=[1, 16, 64, 256, 2048, 4096], ranks=[16, 64], adapters=[1, 8, 64]),
                             "cpu": dict(adapters=[3])}),
    # Several adapters trained in one batch (multi-job fine-tuning): `adapters` jobs of M/adapters
    # contiguous rows each, forward and backward. One headline row keeps the run within its budget.
    "multi_fwd_bwd": Case(build=multi_batch, backward=True,
                          grids={"headline": dict(shapes=[(4096, 4096)], ms=[4096], adapters=[4]),
                                 "full": dict(ms=[1024, 4096], ranks=[16, 64], adapters=[4, 16]),
                                 "cpu": dict(adapters=[3])}),
    # DoRA (one projection): PEFT's DoRA layer, fusedlora.dora_linear, and fusedlora's plain LoRA on the
    # same shape as the cost DoRA is held to (forward+backward within 1.15x of it).
    "dora_fwd": Case(build=dora_bench, grids={"headline": dict(shapes=[(4096, 4096)], ms=[16, 4096]),
                                              "full": dict(ms=[1, 16, 256, 2048, 8192], ranks=[16, 64])}),
    "dora_fwd_bwd": Case(build=dora_bench, backward=True,
                         grids={"headline": dict(shapes=[(4096, 4096)], ms=[4096]),
                                "full": dict(ms=[2048, 8192], ranks=[16, 64])}),
    # QLoRA and QDoRA (one projection over a bitsandbytes nf4 base): PEFT's bnb LoRA layer against the
    # same layer patched by fusedlora. Without bitsandbytes these cases have no rows (skipped()).
    "qlora_fwd": Case(build=qlora_bench, missing=bitsandbytes_missing,
                      grids={"headline": dict(shapes=[(4096, 4096)], ms=[16, 4096]),
                             "full": dict(ms=[1, 16, 256, 2048, 8192], ranks=[16, 64])}),
    "qlora_fwd_bwd": Case(build=qlora_bench, backward=True, missing=bitsandbytes_missing,
                          grids={"headline": dict(shapes=[(4096, 4096)], ms=[16, 4096]),
                                 "full": dict(ms=[2048, 8192], ranks=[16, 64])}),
    # One MoE layer's experts with LoRA on both expert parameters (moe_providers.py): K→N is the hidden size
    # H and the experts' intermediate size I, M the tokens; Qwen3-30B-A3B's layer (E = 128, top-8, H = 2048,
    # I = 768) at prefill and at decode.
    "moe_fwd": Case(build=moe_bench, grids={"headline": dict(shapes=[(2048, 768)], ms=[16, 4096]),
                                            "full": dict(shapes=[(2048, 768)], ms=[1, 16, 256, 4096, 8192],
                                                         ranks=[16, 64])}),
    "moe_fwd_bwd": Case(build=moe_bench, backward=True,
                        grids={"headline": dict(shapes=[(2048, 768)], ms=[16, 4096]),
                               "full": dict(shapes=[(2048, 768)], ms=[256, 4096, 8192], ranks=[16, 64])}),
}


def skipped():
    """{case: why} for the cases that cannot run here: specs() gives them no rows."""
    return {name: why for name, case in CASES.items() if (why := case.missing()) is not None}


def specs(size):
    """Rows to run, size 'headline', 'full', 'plans' or 'cpu'; bf16 throughout, fp16 on a subset with
    'full'. None for a case in skipped()."""
    out, skip = [], skipped()
    for name, case in CASES.items():
        if name in skip:
            continue
        if size == "plans":
            if name in PLANS_CASES:
                axes = (PLANS_GRID["shapes"], PLANS_GRID["ms"], PLANS_GRID["ranks"], PLANS_GRID["adapters"])
                out += [Spec(name, M, K, N, r, "bf16", a) for (K, N), M, r, a in itertools.product(*axes)]
            continue
        if size == "cpu":
            adapters = case.grids.get("cpu", {}).get("adapters", [1])
            out += [Spec(name, M, K, N, r, dtype, a) for M, K, N, r, dtype in CPU_GRID for a in adapters]
            continue
        grid = {**GRIDS[size], **case.grids.get(size, {})}
        axes = (grid["shapes"], grid["ms"], grid["ranks"], grid["adapters"])
        for (K, N), M, r, adapters in itertools.product(*axes):
            out.append(Spec(name, M, K, N, r, "bf16", adapters))
            if size == "full" and (K, N) in FP16_SUBSET["shapes"] and r in FP16_SUBSET["ranks"]:
                out.append(Spec(name, M, K, N, r, "fp16", adapters))
    return out


def all_providers():
    """Every provider name of every case, in order."""
    import moe_providers
    import multi_providers
    import providers
    return list(dict.fromkeys(providers.PROVIDERS + sum(multi_providers.PROVIDERS.values(), ())
                              + sum(moe_providers.PROVIDERS.values(), ())))


def make_row(spec, provider, **measured):
    """A result row: the schema's keys in order, then the extras; r and adapters are None for base."""
    lora = provider != "base"
    row = dict(case=spec.case, provider=provider, M=spec.M, K=spec.K, N=spec.N, r=spec.r if lora else None,
               dtype=spec.dtype, adapters=spec.adapters if lora else None)
    row.update({key: measured.get(key) for key in ROW_KEYS[8:] + EXTRA_KEYS})
    return row


def base_key(row):
    return (row["case"], row["M"], row["K"], row["N"], row["dtype"])


def add_ratios(rows):
    """ratio_to_base: the row's median time over the base row's at the same case, M, K, N and dtype."""
    base = {base_key(row): row["ms"] for row in rows if row["provider"] == "base"}
    for row in rows:
        floor = base.get(base_key(row))
        row["ratio_to_base"] = row["ms"] / floor if row["ms"] is not None and floor else None
    return rows


def time_cuda(fn):
    """(median ms over CUDA events, peak MiB the call allocates above what was allocated before it)."""
    fn()  # warm-up outside the numbers: compilation, autotuning, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    # do_bench zeroes a buffer larger than L2 before every call and excludes its own warm-up.
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak_mb


@contextlib.contextmanager
def provider_plan(name):
    """A provider named like "fusedlora[split]" runs with FUSEDLORA_PLAN forced to the bracketed plan, one
    named like "fusedlora[torch]" with FUSEDLORA_BACKEND forced to the bracketed backend, while it is
    checked and timed (set once, outside the timed calls)."""
    choice = name[name.index("[") + 1:-1] if name.endswith("]") else None
    if choice is not None and choice not in planner.PLANS and choice not in knobs.BACKENDS:
        raise ValueError(f"provider {name!r} names no execution plan of {planner.PLANS} nor backend of "
                         f"{knobs.BACKENDS}")
    variable = knobs.PLAN if choice in planner.PLANS else knobs.BACKEND
    old = os.environ.get(variable)
    if choice is not None:
        os.environ[variable] = choice
    try:
        yield
    finally:
        if choice is not None:
            if old is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = old


def host_us(fn, calls=30):
    """Median host time of one call in µs: the GPU idle before each call, so the call returns as soon
    as its work is queued and the time is the Python, dispatch and launch work alone. At decode sizes
    this, not the kernels, decides eager speed."""
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def run_rows(todo, device, timed, log=print, only=None, on_row=None):
    """Check every provider of every spec (or those named in `only`) against float64; with timed, time
    it on CUDA too. Returns (rows, failures): a provider that fails its check is not timed and is listed.
    on_row(row) is called as each row finishes (record.Record.add puts it on the disk)."""
    rows, failures, done_groups = [], [], set()
    for i, spec in enumerate(todo, 1):
        case = CASES[spec.case]
        bench = case.build(case, spec, device, rotate=timed)
        names = [n for n in bench.providers if (n != "base" or spec.group not in done_groups)
                 and (only is None or n in only)]
        done_groups.add(spec.group)
        for name in names:
            with provider_plan(name):
                err, tol = bench.check(name), bench.tolerance
                measured = dict(rel_err=err, saved_mb=bench.saved_mb(name))
                ok = err <= tol
                if not ok:
                    failures.append(f"{spec} {name}: relative error {err:.2e} over {tol:.2e}")
                elif timed:
                    ms, peak_mb = time_cuda(bench.providers[name])
                    measured.update(ms=ms, peak_mb=peak_mb, tflops=bench.flops(name) / ms * 1e-9,
                                    host_us=host_us(bench.providers[name]))
            rows.append(make_row(spec, name, **measured))
            add_ratios([row for row in rows if base_key(row) == spec.group])
            log(row_line(rows[-1], f"[{i}/{len(todo)}]", ok, tol))
            if on_row is not None:
                on_row(rows[-1])
        del bench
        if timed:
            torch.cuda.empty_cache()
    return add_ratios(rows), failures + memory_failures(rows)


def memory_failures(rows):
    """Wherever dropout is on, fusedlora must keep less for backward than PEFT: no mask and no dropped
    copy of x, only x, the rank-r S and the seed. In moe_fwd_bwd, at most MOE_SAVED_SHARE of PEFT's."""
    saved = {}
    for row in rows:
        if CASES[row["case"]].dropout_p > 0 and row["provider"] in ("peft", "fusedlora"):
            key = base_key(row) + (row["r"], row["adapters"])
            saved.setdefault(key, {})[row["provider"]] = row["saved_mb"]
    failures = [f"{key}: fusedlora keeps {pair['fusedlora']:.4g} MiB for backward, peft {pair['peft']:.4g} MiB"
                for key, pair in saved.items() if len(pair) == 2 and not pair["fusedlora"] < pair["peft"]]
    # MoE training: PEFT keeps W + ΔW of every expert for backward, fusedlora the routed activations alone.
    moe = {}
    for row in rows:
        if row["case"] == "moe_fwd_bwd" and row["saved_mb"] is not None:
            moe.setdefault(base_key(row) + (row["r"],), {})[row["provider"]] = row["saved_mb"]
    for key, by in moe.items():
        for name in (n for n in by if n.startswith("fusedlora")):
            if "peft" in by and not by[name] <= MOE_SAVED_SHARE * by["peft"]:
                failures.append(f"{key}: {name} keeps {by[name]:.4g} MiB for backward, more than {MOE_SAVED_SHARE:g} "
                                f"of peft's {by['peft']:.4g} MiB")
    return failures


def row_line(row, where, ok, tol):
    """One line per provider while the suite runs."""
    timing = (f"{row['ms']:9.4f} ms {row['tflops']:6.1f} TFLOP/s x{fmt(row['ratio_to_base'], '.3f')} of base "
              f"host {row['host_us']:.0f} us peak {mib(row['peak_mb'])} MiB  " if row["ms"] is not None else "")
    saved = f"saved {mib(row['saved_mb'])} MiB  " if row["saved_mb"] is not None else ""
    return (f"{where} {row['case']:9} {row['provider']:17} M={row['M']:<5} K={row['K']:<5} N={row['N']:<5} "
            f"r={fmt(row['r'], 'd'):<3} {row['dtype']}  {timing}{saved}"
            f"rel err {row['rel_err']:.1e} (bound {tol:.1e}) {'ok' if ok else 'WRONG'}")


def commit():
    """Short hash of HEAD, with +dirty when tracked files differ from it: a reader can tell which
    code produced a result."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(gpu: Optional[str]):
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(gpu=gpu or CPU_NAME, torch=torch.__version__, triton=triton.__version__, commit=commit(),
                date=now.isoformat(timespec="seconds"))
