"""The per-shape cache of eager lora_linear and lora_add calls: the work a call's checks, plan and
launches repeat for every call of the same shape, done once per key (see the comment below)."""
import math

import torch

from fusedlora.core import knobs, torch_backend
from fusedlora.core.dropout import check_seed, keep_threshold
from fusedlora.kernels import configs
from fusedlora.kernels.common import fp32_matmul_allows_tf32
from fusedlora.ops.single import (_add_backward, _add_forward, _int_seed, _linear_backward, _plan, _rows, lora_add,
                                  lora_linear)
from fusedlora.plans import single as plans

# ---- eager calls: a per-shape cache ---------------------------------------------------------------
# An eager call at decode sizes (HF generate, an eval loop, a small training step) costs its host time:
# the checks, the backend and plan choice, the configuration, grid, strides and constexprs of its
# launch, each a few microseconds. All of them depend only on what `fast_key` reads, so they are worked
# out once per key (by the full path, whose checks run first) and kept as an entry that allocates the
# output and launches. Only specializations are kept, never a tensor or an address: every call passes
# its own tensors, so a weight changed in place or replaced is read as it is. The key holds every
# property the checks, the planner, the configuration and the launch read: each tensor's type, shape,
# strides, dtype, device and address modulo 16 (Triton specializes on 16-byte alignment), whether bias
# is given, the types of scaling and dropout_p and the value of dropout_p, whether a seed is given, the
# raw FUSEDLORA_BACKEND and FUSEDLORA_PLAN settings, and for float32 x torch's tf32 switch for fp32
# matmuls (which chooses the dots' precision). The scaling and seed are per-call values, checked on
# every call. kernels/configs.clear_caches clears it too. A call that needs a gradient is keyed also by
# which inputs need one (_Train, _AddTrain; else _Full, _Added through the autograd Function);
# torch.compile takes the full path.
FAST_MAX_ENTRIES = 4096
_FAST = {}
configs.CLEAR_HOOKS.append(_FAST.clear)


# torch's fp32 matmul precision settings, read through the getter its own properties call (torch >= 2.9;
# ~0.2 µs against ~2 µs through torch.backends): fp32_matmul_allows_tf32 is a function of these two.
_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def _fp32_precision():
    if _precision_getter is None:
        return fp32_matmul_allows_tf32()
    return _precision_getter("cuda", "matmul"), _precision_getter("generic", "all")


def fast_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The cache key of an eager lora_linear call, or None when the call is not one the cache can key (an
    argument that is not a tensor: the full path names it). A call that needs gradients is keyed with
    which of its inputs need one."""
    try:
        needs = None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                        or lora_B.requires_grad or (bias is not None and bias.requires_grad)):
            needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                     lora_A.requires_grad, lora_B.requires_grad)
        dtype = x.dtype
        return (type(x), x.shape, x.stride(), dtype, x.device, x.data_ptr() & 15,
                type(weight), weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() & 15,
                type(lora_A), lora_A.shape, lora_A.stride(), lora_A.dtype, lora_A.device, lora_A.data_ptr() & 15,
                type(lora_B), lora_B.shape, lora_B.stride(), lora_B.dtype, lora_B.device, lora_B.data_ptr() & 15,
                None if bias is None else (type(bias), bias.shape, bias.stride(), bias.dtype, bias.device,
                                           bias.data_ptr() & 15),
                type(scaling), type(dropout_p), dropout_p, seed is None, knobs.call_state(),
                _fp32_precision() if dtype is torch.float32 else None, needs)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, or tensors without storage
        return None


def _finite(scaling):
    """scaling as a float, or None when it is not finite (the full path then raises)."""
    if type(scaling) is not float:
        scaling = float(scaling)
    return scaling if -math.inf < scaling < math.inf else None


class _OneLaunch:
    """An entry whose call is the one-launch forward (the fused plan at decode sizes). No gradient
    follows, so the kernel writes no S (and none is allocated)."""
    __slots__ = ("run", "y_shape", "dtype", "device", "p", "keep", "threshold")

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed, addend=None):
        if type(scaling) is not float or not -math.inf < scaling < math.inf:
            scaling = _finite(scaling)
            if scaling is None:
                return None
        seed = 0 if seed is None and not self.p else _int_seed(seed, self.p)
        y = torch.empty(self.y_shape, dtype=self.dtype, device=self.device)
        self.run(x, weight, bias, lora_A, lora_B, y, seed, self.threshold, scaling / self.keep, addend=addend)
        return y


class _Planned:
    """An entry for the other kernel calls: the plan chosen once, the launches as the full path makes them."""
    __slots__ = ("plan", "p")

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed):
        scaling = _finite(scaling)
        if scaling is None:
            return None
        x2, N = _rows(x), weight.shape[0]
        y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
        plans.forward(self.plan, x2, weight, bias, lora_A, lora_B, scaling, self.p, _int_seed(seed, self.p),
                      y.view(-1, N))
        return y


class _Full:
    """An entry for calls with gradients that no one-launch entry serves: the full path's launches, its
    checks skipped."""
    __slots__ = ("p",)

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed):
        scaling = _finite(scaling)
        if scaling is None:
            return None
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, self.p, seed)


class _TorchBackend:
    """An entry for the PyTorch backend (FUSEDLORA_BACKEND=torch, or auto off CUDA)."""
    __slots__ = ("p",)

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed):
        scaling = _finite(scaling)
        if scaling is None:
            return None
        return torch_backend.lora_linear(x, weight, bias, lora_A, lora_B, scaling, self.p, seed)


class _Train:
    """An entry for calls with gradients at the one-launch sizes: the forward's launch bound with S
    written, and the backward's bound once per (strides, dtype, alignment) of the dY it is given, from
    the first backward's saved tensors (the key fixes theirs). It keeps no tensor. needs: which of
    (x, weight, bias, lora_A, lora_B) need a gradient."""
    __slots__ = ("run", "y_shape", "s_shape", "dtype", "device", "p", "keep", "threshold", "needs", "backward",
                 "settings")

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed, base=None):
        if type(scaling) is not float or not -math.inf < scaling < math.inf:
            scaling = _finite(scaling)
            if scaling is None:
                return None
        return _TrainedLoRA.apply(x, weight, bias, lora_A, lora_B, self, scaling / self.keep,
                                  0 if seed is None and not self.p else _int_seed(seed, self.p), base)

    def bound_backward(self, dy, x, weight, lora_A, lora_B, S):
        """The backward's launcher for this dY, or None when dY's rows are not a view of it."""
        spec = (dy.stride(), dy.dtype, dy.data_ptr() & 15)
        run = self.backward.get(spec, False)
        if run is False:
            g, x2 = dy.reshape(-1, dy.shape[-1]), _rows(x)
            need_x, _, _, need_A, need_B = self.needs
            run = (plans.backward_launcher(g, weight, lora_A, lora_B, x2, S, self.p > 0, need_x, need_A, need_B,
                                           x.shape, x.dtype) if g.data_ptr() == dy.data_ptr() else None)
            self.backward[spec] = run
        return run


class _AddTrain(_Train):
    """A lora_add entry for calls with gradients at the one-launch sizes (weight and bias None)."""
    __slots__ = ()

    def __call__(self, base, x, lora_A, lora_B, scaling, seed):
        return _Train.__call__(self, x, None, None, lora_A, lora_B, scaling, seed, base)


class _TrainedLoRA(torch.autograd.Function):
    """lora_linear, or lora_add (weight None, base given), with gradients through a _Train entry: one
    launch each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, entry, scale, seed, base):
        y = torch.empty(entry.y_shape, dtype=entry.dtype, device=entry.device)
        S = torch.empty(entry.s_shape, dtype=torch.float32, device=entry.device)
        entry.run(x, weight, bias, lora_A, lora_B, y, seed, entry.threshold, scale, S, addend=base)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.entry, ctx.scale, ctx.seed = entry, scale, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S = saved = ctx.saved_tensors
        entry = ctx.entry
        dbase = dy if ctx.needs_input_grad[8] else None
        # The settings the backward was bound under (a plan or tf32 switch changed since the forward is
        # read by the full path, as it would be without the cache), and a dY the entry can bind.
        run = entry.bound_backward(dy, *saved) if _settings(x.dtype, entry.dtype) == entry.settings else None
        if run is not None:
            dx, dA, dB = run(dy, weight, lora_A, lora_B, x, S, ctx.scale, ctx.seed, entry.threshold)
            return dx, None, None, dA, dB, None, None, None, dbase
        # The full path's backward.
        need_x, _, _, need_A, need_B = entry.needs
        if weight is None:
            _, dx, dA, dB = _add_backward(dy, x, lora_A, lora_B, S, ctx.scale * entry.keep, entry.p, ctx.seed,
                                          (False, need_x, need_A, need_B))
            return dx, None, None, dA, dB, None, None, None, dbase
        grads = _linear_backward(dy, x, weight, lora_A, lora_B, S, ctx.scale * entry.keep, entry.p, ctx.seed,
                                 entry.needs)
        return (*grads, None, None, None, None)


def _settings(*dtypes):
    """What a call's launches depend on beyond its tensors: the raw FUSEDLORA_BACKEND and FUSEDLORA_PLAN,
    and with an fp32 tensor torch's fp32 matmul precision (as in the keys)."""
    return knobs.call_state(), _fp32_precision() if torch.float32 in dtypes else None


def _train_entry(cls, x, x2, weight, bias, lora_A, lora_B, dropout_p, needs, base2=None):
    """A _Train (or _AddTrain, with base2) entry for a call whose forward and backward are one launch
    each, or None when the base weight or bias needs a gradient (the full path computes dW and db)."""
    if needs[1] or needs[2] or not plans.fits(x2.shape[0], lora_A.shape[0]):
        return None
    entry = cls()
    M, N = x2.shape[0], lora_B.shape[0]
    out_dtype = x.dtype if base2 is None else base2.dtype
    entry.y_shape, entry.s_shape = (*x.shape[:-1], N), (M, lora_A.shape[0])
    entry.dtype, entry.device, entry.needs, entry.backward = out_dtype, x.device, needs, {}
    entry.keep, entry.threshold = 1.0 - dropout_p, keep_threshold(dropout_p)
    entry.settings = _settings(x.dtype, out_dtype)
    entry.run = plans.gemm_shrink_launcher(x2, weight, bias, lora_A, lora_B,
                                           torch.empty(entry.s_shape, dtype=torch.float32, device=x.device),
                                           torch.empty((M, N), dtype=out_dtype, device=x.device),
                                           dropout=dropout_p > 0, addend=base2)
    return entry


def fast_entry(key, backend: str, x, weight, bias, lora_A, lora_B, dropout_p: float, seed):
    """Make and keep the entry for `key`, from a call that passed every check (dropout_p validated)."""
    if seed is not None and backend != "torch":
        check_seed(seed)  # before anything is made, as the full path checks it before any launch
    if backend == "torch":
        entry = _TorchBackend()
    else:
        x2, N = _rows(x), weight.shape[0]
        M = x2.shape[0]
        plan = _plan("forward", x2, weight, lora_A)
        # The one-launch kernel takes x itself (any (*, K) tensor whose rows x2 views) and writes y in its
        # final shape: a reshape that copied, or an empty call, takes the planned entry.
        one = plans.one_launch(plan, x2, lora_A) and M > 0 and N > 0 and x2.data_ptr() == x.data_ptr()
        needs = key[-1]
        if needs is not None:
            entry = (_train_entry(_Train, x, x2, weight, bias, lora_A, lora_B, dropout_p, needs)
                     if one and _plan("backward", x2, weight, lora_A) == "fused" else None) or _Full()
        elif one:
            entry = _OneLaunch()
            entry.y_shape = (*x.shape[:-1], N)
            entry.dtype, entry.device = x.dtype, x.device
            entry.keep, entry.threshold = 1.0 - dropout_p, keep_threshold(dropout_p)
            y2 = torch.empty((M, N), dtype=x.dtype, device=x.device)
            entry.run = plans.gemm_shrink_launcher(x2, weight, bias, lora_A, lora_B, None, y2, dropout=dropout_p > 0)
        else:
            entry = _Planned()
            entry.plan = plan
    entry.p = dropout_p
    if len(_FAST) >= FAST_MAX_ENTRIES:
        _FAST.clear()
    _FAST[key] = entry
    return entry


def add_fast_key(base, x, lora_A, lora_B, scaling, dropout_p, seed):
    """The cache key of an eager lora_add call (as fast_key; the same cache, its own keys)."""
    try:
        needs = None
        if torch.is_grad_enabled() and (base.requires_grad or x.requires_grad or lora_A.requires_grad
                                        or lora_B.requires_grad):
            needs = (base.requires_grad, x.requires_grad, lora_A.requires_grad, lora_B.requires_grad)
        return ("lora_add", type(base), base.shape, base.stride(), base.dtype, base.device, base.data_ptr() & 15,
                type(x), x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
                type(lora_A), lora_A.shape, lora_A.stride(), lora_A.dtype, lora_A.device, lora_A.data_ptr() & 15,
                type(lora_B), lora_B.shape, lora_B.stride(), lora_B.dtype, lora_B.device, lora_B.data_ptr() & 15,
                type(scaling), type(dropout_p), dropout_p, seed is None, knobs.call_state(),
                _fp32_precision() if torch.float32 in (x.dtype, base.dtype) else None, needs)
    except (AttributeError, TypeError, RuntimeError):
        return None


class _Added:
    """A lora_add entry: the backend chosen once; the kernels' launches as the full path makes them
    (grad: through its autograd Function)."""
    __slots__ = ("torch", "grad", "p")

    def __call__(self, base, x, lora_A, lora_B, scaling, seed):
        scaling = _finite(scaling)
        if scaling is None:
            return None
        if self.torch:
            return torch_backend.lora_add(base, x, lora_A, lora_B, scaling, self.p, seed)
        if self.grad:
            return lora_add(base, x, lora_A, lora_B, scaling, self.p, seed)
        return _add_forward(base, x, lora_A, lora_B, scaling, self.p, _int_seed(seed, self.p))[0]


class _AddedOneLaunch(_OneLaunch):
    """A lora_add entry whose call is one launch (the single-adapter plan's one-launch rows): the shrink
    inside the expand's K loop, no S written."""
    __slots__ = ()

    def __call__(self, base, x, lora_A, lora_B, scaling, seed):
        return _OneLaunch.__call__(self, x, None, None, lora_A, lora_B, scaling, seed, base)


def add_fast_entry(key, backend: str, base, x, lora_A, lora_B, dropout_p: float, seed):
    """Make and keep the lora_add entry for `key`, from a call that passed every check."""
    if seed is not None and backend != "torch":
        check_seed(seed)
    x2, base2 = _rows(x), _rows(base)
    M, N = x2.shape[0], base.shape[-1]
    # As for lora_linear: the one-launch kernel takes x and base themselves, so both must be viewable
    # as their rows without a copy.
    one = (backend != "torch" and plans.one_launch(_plan("forward", x2, lora_B, lora_A), x2, lora_A) and M > 0
           and N > 0 and x2.data_ptr() == x.data_ptr() and base2.data_ptr() == base.data_ptr())
    needs, entry = key[-1], None  # needs: of (base, x, lora_A, lora_B)
    if needs is not None and one and _plan("backward", x2, lora_B, lora_A) == "fused":
        entry = _train_entry(_AddTrain, x, x2, None, None, lora_A, lora_B, dropout_p,
                             (needs[1], False, False, needs[2], needs[3]), base2)
    if entry is None and needs is None and one:
        entry = _AddedOneLaunch()
        entry.y_shape, entry.dtype, entry.device = base.shape, base.dtype, base.device
        entry.keep, entry.threshold = 1.0 - dropout_p, keep_threshold(dropout_p)
        y2 = torch.empty((M, N), dtype=base.dtype, device=base.device)
        entry.run = plans.gemm_shrink_launcher(x2, None, None, lora_A, lora_B, None, y2, dropout=dropout_p > 0,
                                               addend=base2)
    elif entry is None:
        entry = _Added()
        entry.torch, entry.grad = backend == "torch", needs is not None
    entry.p = dropout_p
    if len(_FAST) >= FAST_MAX_ENTRIES:
        _FAST.clear()
    _FAST[key] = entry
    return entry


# The entry kept for a key, or None (the dict's own get: no Python frame of its own).
fast_lookup = _FAST.get
