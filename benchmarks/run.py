"""fusedlora benchmark: every provider of a comparison checked and timed in one run against the floor.

    python benchmarks/run.py            headline rows (about 150 s on an H200 at commit 8bd3736)
    python benchmarks/run.py --full     the whole grid of shapes, M and r
    python benchmarks/run.py --plans    the fused/split crossover: fwd and fwd_bwd from M = 16 to 2048
    python benchmarks/run.py --out DIR  write the results there instead
    python benchmarks/run.py --dry-run  one tiny shape through the interpreter (the session script's CI run)

Providers: base (the base GEMM alone: the floor), peft (a real PEFT LoRA Linear), addmm (matmul then
in-place addmm of the low-rank term), compile (torch.compile of the reference), fusedlora. Cases: fwd,
fwd_bwd (frozen base weight; gradients for x, lora_A, lora_B) and train_mem (four layers, fwd+bwd,
dropout 0.1); dora_fwd and dora_fwd_bwd (one DoRA projection); qlora_fwd and qlora_fwd_bwd (a PEFT
QLoRA/QDoRA layer over a bitsandbytes 4-bit base, unpatched and patched: skipped, with a message, where
bitsandbytes cannot be imported). Every provider is first checked against a float64 reference.

On a CUDA GPU each row is the median of CUDA-event timings (triton.testing.do_bench: warm-up
excluded, L2 flushed between calls, inputs rotated) and the results go to
benchmarks/results/<gpu>.json, .md and .png (<gpu>-full.* with --full, <gpu>-plans.* with --plans).
Without a GPU the same code runs on tiny shapes through the Triton interpreter: every provider is
checked, memory saved for backward is measured, and no timings are made, because interpreter timings
mean nothing. Files are then written only with --out.

Each row reaches <stem>.jsonl as it finishes, and a SIGTERM (a `timeout`) writes the JSON and markdown
of the rows so far, marked partial (benchmarks/record.py).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if __name__ == "__main__" and not CUDA:
    # Before triton is first imported; tests set these themselves (tests/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import suite  # noqa: E402
from record import Record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true", help="the whole grid instead of the headline rows")
    sizes.add_argument("--plans", action="store_true",
                       help="fwd and fwd_bwd at M = 16..2048 for base, addmm and fusedlora's plans only: "
                            "where the planner should switch plans")
    parser.add_argument("--dry-run", action="store_true",
                        help="without a GPU only: the first tiny shape of the CPU grid, for checking the plumbing")
    parser.add_argument("--out", type=Path, help="directory for <gpu>.json/.md/.png "
                        "(default: benchmarks/results on a GPU, none without one)")
    args = parser.parse_args(argv)
    size = "full" if args.full else "plans" if args.plans else "headline"
    only = suite.PLANS_PROVIDERS if args.plans else None
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if CUDA else None
    result = suite.header(gpu)
    # Say what runs, not only the GPU field of the record (which names no device on CPU).
    where = (f"GPU {gpu}" if CUDA else
             f"CPU ({os.cpu_count()} cores, no CUDA GPU: kernels through the Triton interpreter, no timings)")
    print(f"fusedlora benchmark on {where}: torch {result['torch']}, triton {result['triton']}, "
          f"commit {result['commit']}, fusedlora backend {os.environ.get('FUSEDLORA_BACKEND', 'auto')}")
    if CUDA:
        todo = suite.specs(size)
        print(f"{len(todo)} rows of providers, each checked against float64, then timed.", flush=True)
    else:
        todo = suite.specs("cpu")
        print("No CUDA GPU: checking every provider against float64 through the Triton interpreter on tiny "
              f"shapes{f' (--{size} needs a GPU: same tiny shapes)' if size != 'headline' else ''}.", flush=True)
        if args.plans:
            todo = [spec for spec in todo if spec.case in suite.PLANS_CASES]
        if args.dry_run:
            # Plumbing only: one shape, one single-adapter and one multi-adapter case (forward and backward
            # between them), and no torch.compile provider (an Inductor C++ build per case).
            first = suite.CPU_GRID[0]
            todo = [spec for spec in todo if (spec.M, spec.K, spec.N, spec.r, spec.dtype) == first
                    and spec.case in ("fwd_bwd", "multi_fwd")][:1 if args.plans else None]
            only = [name for name in suite.all_providers() if name != "compile" and (only is None or name in only)]
    reasons = {}
    for case, why in suite.skipped().items():
        reasons.setdefault(why, []).append(case)
    for why, cases in reasons.items():
        print(f"Skipped cases {', '.join(cases)}: {why}.", flush=True)
    out = args.out or (RESULTS if CUDA else None)
    record = Record(out, report.stem(gpu or "cpu-check", size), result, markdown=report.markdown)
    rows, failures = suite.run_rows(todo, "cuda" if CUDA else "cpu", timed=CUDA,
                                    log=lambda line: print(line, flush=True), only=only, on_row=record.add)
    result["rows"] = rows
    print(f"{len(rows) - len(failures)} of {len(rows)} provider checks agree with the float64 reference "
          f"({time.perf_counter() - start:.0f} s).")
    if not CUDA:
        print("No timings: they need a CUDA GPU (interpreter timings mean nothing). Run this command on one.")
    written = record.finish()
    if out is not None:
        for path in written:
            print(f"wrote {path}")
        print(report.plot(result, out / f"{report.stem(gpu or 'cpu-check', size)}.png"))
    else:
        print("Nothing written (pass --out DIR to keep the check rows).")
    if CUDA:
        print("\n" + "\n".join(report.headline(rows)))
    for failure in failures:
        print(f"WRONG: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
