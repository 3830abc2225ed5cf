"""The dropout mask in plain PyTorch: the same Philox4x32-10 bits the kernels draw.

keep[m, k] for x viewed as (rows, K) depends only on (seed, m, k) and p (see kernels/dropout.py for
the formula: column k of row m is word k % 4 of the Philox call at counter (k // 4, m, 0, 0)),
so a result never depends on the backend, the device, the grid or the block sizes.
Written with int64 tensor ops (uint32 products split into 16-bit halves) so that it runs on any
device; registered as the custom op fusedlora::keep_mask so that torch.compile keeps it whole.

Seeds travel as 0-d int64 CPU tensors (seed_tensor): one drawn from torch's generator is then a
value in the graph under torch.compile, not a host int read with .item() (a graph break), and the
backward pass reads the one saved in forward.
"""
import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_LO32 = 0xFFFFFFFF
SEED_LIMIT = 2**63


def _mulhilo(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of the 64-bit product a*b, with b < 2^32 held in int64."""
    lo = (b * a) & _LO32  # int64 wraps, the low 32 bits stay exact
    b_hi, b_lo = b >> 16, b & 0xFFFF
    hi = (b_hi * a + ((b_lo * a) >> 16)) >> 16  # every term < 2^49: no int64 overflow
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32-R on int64 tensors holding uint32 values; k0, k1 are the 32-bit key words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _LO32, (k1 + _W1) & _LO32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Elements whose top 24 Philox bits are >= this are kept: P(keep) = 1 - p to within 2^-24."""
    return math.ceil(p * (1 << 24))


def dropout_mask(seed, shape, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of `shape` that `seed` and drop probability `p` produce in every backend.

    seed: an int in [0, 2**63) or a 0-d int64 CPU tensor (its 64 bits are the Philox key).
    shape: the shape of x, (*, K); the mask is drawn over x viewed as (prod(shape[:-1]), K).
    """
    shape = torch.Size(shape)
    check_seed(seed)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p must be in [0, 1), got {p}")
    if len(shape) == 0:
        raise ValueError("dropout_mask: shape must have at least one dimension (*, K)")
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    device = torch.device("cpu") if device is None else torch.device(device)
    rows = math.prod(shape[:-1])
    return keep_mask_op(seed, rows, shape[-1], keep_threshold(p), device).reshape(shape)


@torch.library.custom_op("fusedlora::keep_mask", mutates_args=())
def keep_mask_op(seed: torch.Tensor, rows: int, cols: int, threshold: int,
                 device: torch.device) -> torch.Tensor:
    """The (rows, cols) keep-mask of a 0-d int64 CPU seed, on `device`.

    A custom op so that torch.compile keeps it whole: Inductor inlines each of the ten Philox rounds
    into its consumers and its lowering grows exponentially (lora_linear with dropout on a (14, 40)
    x took 240 s to compile forward and backward on 2 CPU cores; with the mask as an op, 12 s)."""
    # Masked to 32-bit words: a negative seed tensor is its two's complement, as in the kernels,
    # which read the seed as uint64.
    key = int(seed)
    quads = -(-cols // 4)  # one Philox call per four columns; its words are columns 4q .. 4q+3
    m = torch.arange(rows, dtype=torch.int64, device=device)[:, None].expand(rows, quads)
    q = torch.arange(quads, dtype=torch.int64, device=device)[None, :].expand(rows, quads)
    zero = torch.zeros_like(m)
    words = torch.stack(philox4x32(q, m, zero, zero, key & _LO32, (key >> 32) & _LO32), dim=-1)
    return (words.reshape(rows, 4 * quads)[:, :cols] >> 8) >= threshold


@keep_mask_op.register_fake
def _(seed, rows, cols, threshold, device):
    return torch.empty((rows, cols), dtype=torch.bool, device=device)


def check_seed(seed) -> None:
    """An int in [0, 2**63), or a 0-d int64 CPU tensor (whose value is not read: that would be a
    host sync on the device and a graph break under torch.compile)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"a seed tensor must be a 0-d torch.int64 tensor on the CPU, got shape "
                             f"{tuple(seed.shape)}, {seed.dtype}, {seed.device}")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63) or a 0-d int64 CPU tensor, got {seed!r}")


def draw_seed() -> torch.Tensor:
    """A seed from torch's default CPU generator, as a 0-d int64 tensor: torch.manual_seed
    reproduces it, and activation checkpointing (which restores the RNG state) redraws the same one.
    Under torch.compile the draw is a graph op (Inductor's generator: see README)."""
    return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)


def seed_tensor(seed, dropout_p: float) -> torch.Tensor:
    """The 0-d int64 CPU seed tensor the custom ops take: `seed` (int or tensor) as given, else one
    drawn from torch's generator when dropout_p > 0, else zero (no mask is drawn)."""
    if seed is None:
        return draw_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    check_seed(seed)
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def int_seed(seed, dropout_p: float) -> int:
    """The seed as a Python int for an eager call: as given (checked), drawn from torch's generator when
    dropout_p > 0 and seed is None (a new mask every call), else 0 (no mask is drawn)."""
    if seed is None:
        return int(draw_seed()) if dropout_p > 0 else 0
    check_seed(seed)
    return int(seed)
