"""The headline rows under pytest-benchmark: `pytest benchmarks/` on a CUDA GPU, skipped without one.

Each test checks its provider against float64 first, then times it (the call and a synchronize, so
the host clock sees the GPU work). run.py is the suite of record: CUDA-event medians, L2 flushed,
ratios to the base GEMM; this is the same work for people who track runs with pytest-benchmark.
"""
import pytest
import torch

import dora_providers
import multi_providers
import qlora_providers
import suite
from providers import PROVIDERS

NO_GPU = "timings need a CUDA GPU (on CPU, python benchmarks/run.py checks the kernels)"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)

PARAMS = [pytest.param(s, provider, id=f"{s.case}-M{s.M}-K{s.K}-N{s.N}-r{s.r}-{s.dtype}-{provider}")
          for s in suite.specs("headline")
          for provider in {**multi_providers.PROVIDERS, **dora_providers.PROVIDERS,
                           **qlora_providers.PROVIDERS}.get(s.case, PROVIDERS)]
_built = {}


def bench_for(spec):
    """The row's inputs and providers, built once for all its providers; the previous row's are freed."""
    if spec not in _built:
        _built.clear()
        torch.cuda.empty_cache()
        case = suite.CASES[spec.case]
        _built[spec] = case.build(case, spec, "cuda")
    return _built[spec]


@pytest.mark.parametrize("spec,provider", PARAMS)
def test_headline(benchmark, spec, provider):
    bench = bench_for(spec)
    with suite.provider_plan(provider):  # fusedlora[fused] / fusedlora[split]: the plan forced
        err = bench.check(provider)
        assert err <= bench.tolerance, f"{provider}: relative error {err:.2e} over {bench.tolerance:.2e}"
        fn = bench.providers[provider]

        def step():
            fn()
            torch.cuda.synchronize()

        step()  # compilation and autotuning stay out of the numbers
        benchmark.extra_info.update(spec._asdict(), provider=provider, flops=bench.flops(provider))
        benchmark.pedantic(step, rounds=50, warmup_rounds=5)
