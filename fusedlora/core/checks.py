"""Input validation shared by the public functions: every error names the tensor and its shape and is
raised before any kernel runs."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype}, {t.device})"


def require_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{describe(name, t)}: dtype must be float32, float16 or bfloat16")


def require_scalar(name: str, value, low=None, high=None) -> float:
    """A finite real number (Python or NumPy), with low <= value < high where given."""
    if type(value) is float and -math.inf < value < math.inf and (low is None or value >= low) and \
            (high is None or value < high):
        return value  # the common case, without the abstract-class checks below (host time per call)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float module
    # attribute arrives as a SymFloat, which comparisons turn into guards and math.isfinite breaks.
    if not -math.inf < value < math.inf:  # NaN compares false
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def _lora_linear_ok(x, weight, bias, lora_A, lora_B) -> bool:
    """The checks of check_lora_linear in as few operations as possible: a small-batch call spends
    more time on the host than on the GPU, so valid input takes this path and only invalid input pays
    for the detailed checks and their messages."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and (bias is None or isinstance(bias, Tensor))):
        return False
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES or weight.dtype is not dtype or x.dim() < 1:
        return False
    (N, K), (r, K_a), (N_b, r_b) = weight.shape, lora_A.shape, lora_B.shape  # ValueError if not 2-D
    adapter_dtype = lora_A.dtype
    if x.shape[-1] != K or K_a != K or N_b != N or r_b != r or r == 0 or lora_B.dtype is not adapter_dtype \
            or (adapter_dtype is not dtype and adapter_dtype is not torch.float32):
        return False
    if weight.device != device or lora_A.device != device or lora_B.device != device:
        return False
    return bias is None or (bias.dtype is dtype and bias.shape == (N,) and bias.device == device)


def _check_bias_and_dtypes(x, weight, bias, lora_A, lora_B) -> None:
    """The bias (N,) for weight (N, K); weight and bias in x's dtype; the adapters in one dtype, x's or
    float32. Shared by the single- and multi-adapter checks."""
    N = weight.shape[0]
    if bias is not None:
        require_float("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{describe('bias', bias)} must be (N,) = ({N},) for {describe('weight', weight)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{describe(name, t)} must have x's dtype {x.dtype}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{describe('lora_A', lora_A)} and {describe('lora_B', lora_B)} must share one "
                        f"dtype, x's ({x.dtype}) or torch.float32")


def check_lora_linear(x, weight, bias, lora_A, lora_B) -> None:
    """x: (*, K), weight: (N, K), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r); x, weight and
    bias share one float dtype; lora_A and lora_B share x's dtype or float32; one device."""
    try:
        if _lora_linear_ok(x, weight, bias, lora_A, lora_B):
            return
    except ValueError:  # a weight or an adapter that is not 2-D: the checks below name it
        pass
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        require_tensor(name, t)
        require_float(name, t)
    require_tensor("bias", bias, optional=True)
    if x.dim() < 1:
        raise ValueError(f"{describe('x', x)}: x must have shape (*, K)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{describe('weight', weight)} must be (N, K) with K = x.shape[-1] = {x.shape[-1]}"
                         f" for {describe('x', x)}")
    N, K = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (r, K) with K = {K}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError(f"{describe('lora_A', lora_A)}: the LoRA rank r must be at least 1")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"{describe('lora_B', lora_B)} must be (N, r) = ({N}, {r}) to match "
                         f"{describe('weight', weight)} and {describe('lora_A', lora_A)}")
    _check_bias_and_dtypes(x, weight, bias, lora_A, lora_B)
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{describe(name, t)} is not on x's device {x.device}")


def check_dora_magnitude(magnitude, weight, lora_A) -> None:
    """DoRA's magnitude: (N,) for weight (N, K), in the adapters' dtype, on their device."""
    require_tensor("magnitude", magnitude)
    N = weight.shape[0]
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"{describe('magnitude', magnitude)} must be (N,) = ({N},) for {describe('weight', weight)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"{describe('magnitude', magnitude)} must have the adapters' dtype {lora_A.dtype}")
    if magnitude.device != lora_A.device:
        raise ValueError(f"{describe('magnitude', magnitude)} is not on the adapters' device {lora_A.device}")


def check_lora_add(base, x, lora_A, lora_B) -> None:
    """base: (*, N) and x: (*, K) with the same leading shape, lora_A: (r, K), lora_B: (N, r); base and
    x are float tensors (of any float dtypes); lora_A and lora_B share x's dtype or float32; one device."""
    for name, t in (("base", base), ("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        require_tensor(name, t)
        require_float(name, t)
    if x.dim() < 1 or base.dim() != x.dim() or base.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{describe('base', base)} must be (*, N) and {describe('x', x)} (*, K) with the same "
                         "leading shape *")
    N, K = base.shape[-1], x.shape[-1]
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] == 0:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (r, K) with r >= 1 and K = x.shape[-1] = {K}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"{describe('lora_B', lora_B)} must be (N, r) = ({N}, {r}) to match "
                         f"{describe('base', base)} and {describe('lora_A', lora_A)}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{describe('lora_A', lora_A)} and {describe('lora_B', lora_B)} must share one "
                        f"dtype, x's ({x.dtype}) or torch.float32")
    for name, t in (("base", base), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != x.device:
            raise ValueError(f"{describe(name, t)} is not on x's device {x.device}")


INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_ids_values(adapter_ids: torch.Tensor, L: int) -> None:
    """Every id in [-1, L): a read of the values (a host sync on a GPU)."""
    if adapter_ids.numel() and (adapter_ids.min() < -1 or adapter_ids.max() >= L):
        bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= L)][0].item()
        raise ValueError(f"{describe('adapter_ids', adapter_ids)} holds {bad}, outside [-1, L) = [-1, {L})")


def _multi_ok(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks) -> bool:
    """check_multi's shape, dtype and device rules in as few operations as possible: every adapted
    layer of every decode step runs them, so valid input takes this path and only invalid input pays
    for the detailed checks and their messages."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and isinstance(scalings, Tensor) and isinstance(adapter_ids, Tensor)
            and (bias is None or isinstance(bias, Tensor)) and (ranks is None or isinstance(ranks, Tensor))):
        return False
    dtype, device, adapter_dtype = x.dtype, x.device, lora_A.dtype
    if dtype not in FLOAT_DTYPES or weight.dtype is not dtype or x.dim() < 1:
        return False
    (N, K), (L, R, K_a) = weight.shape, lora_A.shape  # ValueError if not 2-D and 3-D
    if x.shape[-1] != K or K_a != K or R == 0 or lora_B.shape != (L, N, R) or lora_B.dtype is not adapter_dtype \
            or (adapter_dtype is not dtype and adapter_dtype is not torch.float32):
        return False
    if scalings.shape != (L,) or not scalings.is_floating_point() or adapter_ids.dtype not in INT_DTYPES \
            or adapter_ids.shape != x.shape[:-1]:
        return False
    if ranks is not None and (ranks.shape != (L,) or ranks.dtype not in INT_DTYPES or ranks.device != device):
        return False
    if bias is not None and (bias.dtype is not dtype or bias.shape != (N,) or bias.device != device):
        return False
    return (weight.device == device and lora_A.device == device and lora_B.device == device
            and scalings.device == device and adapter_ids.device == device)


def check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, values: bool) -> None:
    """multi_lora_linear's inputs: x: (*, K), weight: (N, K), bias: (N,) or None, lora_A: (L, R, K),
    lora_B: (L, N, R), scalings: (L,) float, adapter_ids: integer of shape x.shape[:-1], ranks: (L,)
    integer or None; dtypes as lora_linear; one device. Shapes, dtypes and devices cost a few attribute
    reads (this runs in every layer of every step); the values of ids and ranks are read only when
    `values` is set (the caller knows whether that costs a GPU sync)."""
    try:
        ok = _multi_ok(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    except ValueError:  # a weight or an adapter stack of the wrong rank: the checks below name it
        ok = False
    if ok:
        if values:
            check_ids_values(adapter_ids, lora_A.shape[0])
            check_ranks_values(ranks, lora_A.shape[1])
        return
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        require_tensor(name, t)
        require_float(name, t)
    for name, t in (("scalings", scalings), ("adapter_ids", adapter_ids)):
        require_tensor(name, t)
    require_tensor("bias", bias, optional=True)
    require_tensor("ranks", ranks, optional=True)
    if x.dim() < 1:
        raise ValueError(f"{describe('x', x)}: x must have shape (*, K)")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{describe('weight', weight)} must be (N, K) with K = x.shape[-1] = {K}"
                         f" for {describe('x', x)}")
    N = weight.shape[0]
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (L, R, K) and {describe('lora_B', lora_B)} "
                         "must be (L, N, R)")
    L, R, K_A = lora_A.shape
    if K_A != K or R == 0:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (L, R, K) with R >= 1 and K = {K}")
    if lora_B.shape != (L, N, R):
        raise ValueError(f"{describe('lora_B', lora_B)} must be (L, N, R) = ({L}, N, {R}) with N = {N} to match "
                         f"{describe('lora_A', lora_A)} and {describe('weight', weight)}")
    _check_bias_and_dtypes(x, weight, bias, lora_A, lora_B)
    if not scalings.is_floating_point() or scalings.shape != (L,):
        raise ValueError(f"{describe('scalings', scalings)} must be a float tensor of shape (L,) = ({L},)")
    if adapter_ids.dtype not in INT_DTYPES or adapter_ids.shape != x.shape[:-1]:
        raise TypeError(f"{describe('adapter_ids', adapter_ids)} must be an integer tensor of shape "
                        f"x.shape[:-1] = {tuple(x.shape[:-1])}")
    if ranks is not None and (ranks.dtype not in INT_DTYPES or ranks.shape != (L,)):
        raise TypeError(f"{describe('ranks', ranks)} must be an integer tensor of shape (L,) = ({L},)")
    device = x.device
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("scalings", scalings), ("adapter_ids", adapter_ids), ("ranks", ranks)):
        if t is not None and t.device != device:
            raise ValueError(f"{describe(name, t)} is not on x's device {device}")
    if values:
        check_ids_values(adapter_ids, L)
        check_ranks_values(ranks, R)


def check_col_scale(col_scale, weight, lora_A) -> None:
    """multi_lora_linear's DoRA scale: a float32 tensor (L, N) for lora_A (L, R, K) and weight (N, K), on
    the weight's device."""
    require_tensor("col_scale", col_scale)
    L, N = lora_A.shape[0], weight.shape[0]
    if col_scale.dtype != torch.float32:
        raise TypeError(f"{describe('col_scale', col_scale)} must be float32 (each adapter's magnitude over its "
                        "row norms, as DoRA computes them)")
    if tuple(col_scale.shape) != (L, N):
        raise ValueError(f"{describe('col_scale', col_scale)} must be (L, N) = ({L}, {N}) for "
                         f"{describe('lora_A', lora_A)} and {describe('weight', weight)}")
    if col_scale.device != weight.device:
        raise ValueError(f"{describe('col_scale', col_scale)} is not on the weight's device {weight.device}")


def check_ranks_values(ranks, R: int) -> None:
    """Every rank in [0, R] (None: nothing to check): a read of the values."""
    if ranks is not None and ranks.numel() and (ranks.min() < 0 or ranks.max() > R):
        raise ValueError(f"{describe('ranks', ranks)} must lie in [0, R] = [0, {R}], got {ranks.tolist()}")


def check_moe(x, routing, weight, bias, lora_A, lora_B, scaling, ranks, gather) -> None:
    """moe_lora_linear's inputs (fusedlora/moe.py): x: (T, K) tokens with gather, (P, K) sorted pairs
    without; routing: an ExpertRouting over E experts and L adapters; weight: (E, N, K) any strides;
    bias: (E, N) or None; lora_A: (L, E, R, K) and lora_B: (L, E, N, R), both None for the base alone;
    scaling: a finite real number or an (L,) float tensor; ranks: (L,) integer or None. x, weight and
    bias share one float dtype, the adapters x's dtype or float32; one device. Values of ranks are read
    where values_checked allows (the caller decides); nothing else reads a tensor's values."""
    from fusedlora.core.moe_routing import ExpertRouting  # moe_routing imports this module
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    if not isinstance(routing, ExpertRouting):
        raise TypeError(f"routing must be a fusedlora.ExpertRouting, got {type(routing).__name__}")
    for name, t in (("x", x), ("weight", weight)):
        require_tensor(name, t)
        require_float(name, t)
    require_tensor("bias", bias, optional=True)
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be tensors, or both None for the base projection alone")
    E, L = routing.num_experts, routing.num_adapters
    rows = routing.T if gather else routing.P
    what = f"({routing.T}, K): one row per token of {routing!r}" if gather else \
        f"({routing.P}, K): one row per (token, expert) pair of {routing!r}, in its sorted order"
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(f"{describe('x', x)} must be {what}")
    K = x.shape[1]
    if weight.dim() != 3 or weight.shape[0] != E or weight.shape[2] != K:
        raise ValueError(f"{describe('weight', weight)} must be (E, N, K) = ({E}, N, {K}): one (N, K) weight per "
                         f"expert of {routing!r}, K = x.shape[1]")
    N = weight.shape[1]
    if bias is not None:
        require_float("bias", bias)
        if tuple(bias.shape) != (E, N):
            raise ValueError(f"{describe('bias', bias)} must be (E, N) = ({E}, {N}) for {describe('weight', weight)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{describe(name, t)} must have x's dtype {x.dtype}")
    device = x.device
    if routing.top_k_index.device != device:
        raise ValueError(f"routing is on {routing.top_k_index.device}, x on {device}: one device")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{describe(name, t)} is not on x's device {device}")
    if lora_A is None:
        return
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        require_tensor(name, t)
        require_float(name, t)
    if lora_A.dim() != 4 or lora_A.shape[:2] != (L, E) or lora_A.shape[3] != K or lora_A.shape[2] == 0:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (L, E, R, K) = ({L}, {E}, R, {K}) with R >= 1: L "
                         f"adapters of {routing!r}, one (R, K) factor per expert")
    R = lora_A.shape[2]
    if tuple(lora_B.shape) != (L, E, N, R):
        raise ValueError(f"{describe('lora_B', lora_B)} must be (L, E, N, R) = ({L}, {E}, {N}, {R}) to match "
                         f"{describe('weight', weight)} and {describe('lora_A', lora_A)}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{describe('lora_A', lora_A)} and {describe('lora_B', lora_B)} must share one "
                        f"dtype, x's ({x.dtype}) or torch.float32")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != device:
            raise ValueError(f"{describe(name, t)} is not on x's device {device}")
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point() or tuple(scaling.shape) != (L,):
            raise ValueError(f"{describe('scaling', scaling)} must be a float tensor of shape (L,) = ({L},)")
        if scaling.device != device:
            raise ValueError(f"{describe('scaling', scaling)} is not on x's device {device}")
    else:
        require_scalar("scaling", scaling)
    if ranks is not None:
        require_tensor("ranks", ranks)
        if ranks.dtype not in INT_DTYPES or tuple(ranks.shape) != (L,):
            raise TypeError(f"{describe('ranks', ranks)} must be an integer tensor of shape (L,) = ({L},)")
        if ranks.device != device:
            raise ValueError(f"{describe('ranks', ranks)} is not on x's device {device}")
