"""The Philox dropout mask: bit-exact between kernel and PyTorch, seeded, and never stored."""
import math

import pytest
import torch
from oracle import NAMES, make_inputs
from torch.utils.checkpoint import checkpoint

import fusedlora
from fusedlora.core.dropout import keep_threshold, philox4x32
from fusedlora.kernels.dropout import keep_mask


@pytest.mark.parametrize("counter,key,expected", [
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_torch_philox_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("seed", [0, 1, 977, 2**31 + 5, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_kernel_mask_equals_torch_mask(seed, p, device):
    got = keep_mask(seed, 37, 70, keep_threshold(p), device)
    want = fusedlora.dropout_mask(seed, (37, 70), p, device)
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at {tuple(mismatch[0].tolist())}"


@pytest.mark.parametrize("seed,row,col", [(977, 1, 6), (2**40 + 7, 2, 3)])
def test_an_element_at_the_threshold_is_kept(seed, row, col, device):
    """keep is v >= threshold, v the element's top 24 Philox bits: at p = v / 2^24 the threshold is v
    and the element stays, in the kernel's mask and in PyTorch's; one step above, it goes."""
    quad = torch.tensor([col // 4], dtype=torch.int64)
    words = philox4x32(quad, torch.tensor([row], dtype=torch.int64), torch.zeros_like(quad), torch.zeros_like(quad),
                       seed & 0xFFFFFFFF, seed >> 32)
    v = int(words[col % 4]) >> 8
    assert 0 < v < 2**24 - 1
    assert keep_threshold(v / 2**24) == v
    for p, kept in ((v / 2**24, True), ((v + 1) / 2**24, False)):
        kernel = keep_mask(seed, row + 1, col + 1, keep_threshold(p), device)
        torch_mask = fusedlora.dropout_mask(seed, (row + 1, col + 1), p, device)
        assert bool(kernel[row, col]) is kept and bool(torch_mask[row, col]) is kept, (p, v)


@pytest.mark.parametrize("seed", [977, 2**40 + 7, -5])
def test_tensor_seed_is_the_int_seed(seed, device):
    """A 0-d int64 seed tensor draws the mask of its value in the kernels and in PyTorch alike; a
    negative one (only a tensor can hold it) is its 64-bit two's complement in both."""
    seed_t = torch.tensor(seed, dtype=torch.int64)
    mask = fusedlora.dropout_mask(seed_t, (16, 32), 0.5, device)
    assert torch.equal(mask, keep_mask(seed, 16, 32, keep_threshold(0.5), device))
    inputs = [make_inputs(16, 32, 24, 4, torch.float32, device=device)[n] for n in NAMES]
    y = fusedlora.lora_linear(*inputs, 1.0, 0.5, seed=seed_t)
    ref = fusedlora.reference.lora_linear(*inputs, 1.0, mask, 0.5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if seed >= 0:
        assert torch.equal(mask, fusedlora.dropout_mask(seed, (16, 32), 0.5, device))
        assert torch.equal(y, fusedlora.lora_linear(*inputs, 1.0, 0.5, seed=seed))


def test_mask_statistics_and_shape():
    p, shape = 0.3, (4, 50, 300)
    mask = fusedlora.dropout_mask(11, shape, p)
    assert mask.shape == shape and mask.dtype == torch.bool
    n = mask.numel()
    # Kept fraction within 5 standard deviations of 1 - p.
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # The mask is drawn over x viewed as (rows, K): the leading shape does not matter.
    assert torch.equal(mask.reshape(200, 300), fusedlora.dropout_mask(11, (200, 300), p))
    assert not torch.equal(mask, fusedlora.dropout_mask(12, shape, p))
    assert fusedlora.dropout_mask(11, shape, 0.0).all()


def test_seeds_reproduce(device):
    inputs = [make_inputs(16, 32, 24, 4, torch.float32, device=device)[n] for n in NAMES]
    torch.manual_seed(0)
    y1 = fusedlora.lora_linear(*inputs, 1.0, dropout_p=0.5)
    y2 = fusedlora.lora_linear(*inputs, 1.0, dropout_p=0.5)
    torch.manual_seed(0)
    y3 = fusedlora.lora_linear(*inputs, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    assert torch.equal(fusedlora.lora_linear(*inputs, 1.0, 0.5, seed=3),
                       fusedlora.lora_linear(*inputs, 1.0, 0.5, seed=3))
    assert torch.equal(fusedlora.lora_linear(*inputs, 1.0, 0.0, seed=3),
                       fusedlora.lora_linear(*inputs, 1.0, 0.0, seed=4))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpointing_recomputes_the_same_mask(use_reentrant, backend, monkeypatch, device):
    """Checkpointing restores the RNG state before recomputing, so the drawn seed and mask repeat."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = make_inputs(16, 32, 24, 4, torch.float32, device=device)
    grads = []
    for use_checkpoint in (False, True):
        A = inputs["lora_A"].clone().requires_grad_()
        x = inputs["x"].clone().requires_grad_()

        def layer(x, A):
            return fusedlora.lora_linear(x, inputs["weight"], inputs["bias"], A, inputs["lora_B"], 1.0, 0.5)

        torch.manual_seed(123)
        y = checkpoint(layer, x, A, use_reentrant=use_reentrant) if use_checkpoint else layer(x, A)
        y.square().sum().backward()
        grads.append((x.grad, A.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_saved_tensors_are_x_S_and_parameters_only(device):
    """Backward keeps x, the (M, r) product S and the parameters (the seed is a Python int in eager
    mode): no (M, K) mask or dropped x."""
    M, K, N, r = 48, 64, 40, 8
    inputs = make_inputs(M, K, N, r, torch.float32, device=device)
    A = inputs["lora_A"].clone().requires_grad_()
    B = inputs["lora_B"].clone().requires_grad_()
    x = inputs["x"]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fusedlora.lora_linear(x, inputs["weight"], inputs["bias"], A, B, 1.0, dropout_p=0.3, seed=1)
    known = {t.data_ptr() for t in (x, inputs["weight"], A, B)}
    extra = [t for t in saved if t.data_ptr() not in known]
    assert [(tuple(t.shape), t.dtype) for t in extra] == [((M, r), torch.float32)], [tuple(t.shape) for t in saved]
    y.sum().backward()
