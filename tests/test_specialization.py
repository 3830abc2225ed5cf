"""Per-call values never select a new compiled kernel: the seed and the dropout threshold are not
specialized, so every seed shares one compiled variant (one cache key) with every other.

Checked with Triton's own binder for an sm_90 target (tests/sm90.py) on the real arguments of each
launcher's launch, recorded instead of run."""
import pytest
import torch

from fusedlora.kernels import dropout, lora_gemm, lora_shrink
from sm90 import bind, record_launches

SEEDS = (1, 5, 2**40 + 32, 2**62 + 3)
THRESHOLDS = (1, 16, 1 << 20)


def _key(kernel, args, kwargs):
    _, _, specialization, options = bind(kernel, args, kwargs)
    return tuple(specialization), tuple(sorted(options.items()))


def _drive(seed, threshold):
    x, w = torch.randn(64, 96), torch.randn(80, 96)
    a, s = torch.randn(16, 96), torch.randn(64, 16)
    yield lora_gemm._lora_gemm_kernel, lambda: lora_gemm.lora_gemm(
        x, w, p=s, q=torch.randn(80, 16), seed=seed, threshold=threshold, dropout=True)
    yield lora_gemm._lora_gemm_kernel, lambda: lora_gemm.lora_expand(
        s, torch.randn(80, 16), addend=torch.randn(64, 80), seed=seed, threshold=threshold, dropout=True)
    yield lora_shrink._lora_shrink_kernel, lambda: lora_shrink.lora_shrink(
        x, a, 2.0, seed=seed, threshold=threshold, dropout=True)
    yield lora_shrink._lora_shrink_kernel, lambda: lora_shrink.lora_shrink(
        x.t(), s.t(), 1.0, seed=seed, threshold=threshold, dropout=True, mask_transposed=True)
    yield dropout._keep_mask_kernel, lambda: dropout.keep_mask(seed, 40, 48, threshold, "cpu")


@pytest.mark.parametrize("which", range(5))
def test_seeds_and_thresholds_share_one_specialization(which):
    keys = set()
    for seed in SEEDS:
        for threshold in THRESHOLDS:
            kernel, call = list(_drive(seed, threshold))[which]
            (launch,) = record_launches(call, [kernel])
            keys.add(_key(*launch))
    assert len(keys) == 1, f"{kernel.fn.__name__}: {len(keys)} specializations for seeds {SEEDS}"


def test_a_plain_int_argument_would_specialize():
    """The check can fail: without do_not_specialize these seeds give four keys (1 a constant, 5 an
    i32, 2**40 + 32 an i64 divisible by 16, 2**62 + 3 a plain i64)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK), seed)

    out = torch.empty(16, dtype=torch.int64)
    keys = {_key(kernel, (out, seed), dict(BLOCK=16)) for seed in SEEDS}
    assert len(keys) == 4


def test_seed_words_are_the_seed():
    for seed in SEEDS + (0, 2**64 - 1, -1, 2**31, 2**32 - 1):
        lo, hi = dropout.seed_words(seed)
        assert all(-2**31 <= w < 2**31 for w in (lo, hi))
        assert ((hi & 0xFFFFFFFF) << 32 | (lo & 0xFFFFFFFF)) == seed & (2**64 - 1)


def test_fp32_matmul_setting_read_through_either_api(monkeypatch):
    """The new API set (where the legacy getter then raises) and the legacy one both read without
    raising, and decide the all-fp32 dots' precision."""
    from fusedlora.kernels import common
    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(common, "interpreting", lambda: False)
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else None
    try:
        if before is not None:
            matmul.fp32_precision = "tf32"
            assert common.fp32_matmul_allows_tf32()
            assert common.dot_precision(torch.float32, torch.float32) == "tf32"
            matmul.fp32_precision = "ieee"
            assert not common.fp32_matmul_allows_tf32()
        else:
            matmul.allow_tf32 = True
            assert common.fp32_matmul_allows_tf32()
            matmul.allow_tf32 = False
        assert common.dot_precision(torch.float32, torch.float32) == "ieee"
        assert common.dot_precision(torch.float32, torch.float32, low_rank=True) == "ieee"
        assert common.dot_precision(torch.bfloat16, torch.float32, low_rank=True) == "tf32x3"
        assert common.dot_precision(torch.bfloat16, torch.bfloat16) == "tf32"
    finally:
        if before is not None:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = False
