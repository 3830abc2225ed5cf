"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, run through the fused path.

    y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ,   scaling = lora_alpha / r   (lora_alpha / √r with rslora)

The module calls the functional API only (fusedlora.lora_linear), so the backend choice
(FUSEDLORA_BACKEND) applies to it as to any other call. Parameter names and initialisations follow
PEFT's lora.Linear, so an adapter moves between the two by renaming keys (see adapter_io.py).
"""
from typing import Optional, Union

import torch
from torch import nn

from fusedlora.core.reference import dora_weight_norm
from fusedlora.functional import dora_linear, lora_add, lora_linear
from fusedlora.modules.rules import check_init_lora_weights, check_lora_options, init_lora_factors, set_lora_options


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's own: one LoRALinear can stand in for it. Subclasses
    that change forward (quantized layers, for instance) compute something else and are refused."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def fused_call(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
    """lora_linear with autocast honoured the way nn.Linear honours it.

    Under autocast, x, weight and bias go to the autocast dtype (nn.Linear would cast them the same
    way); fp32 adapter weights stay fp32, which lora_linear accepts under a half-precision x and
    which loses nothing. Autocast is then switched off for the call itself, so both backends see
    exactly these dtypes.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    dtype = torch.get_autocast_dtype(device_type)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


def dora_call(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float,
              weight_fn=None) -> torch.Tensor:
    """dora_linear with autocast honoured as fused_call honours it (the magnitude follows the adapters).
    weight_fn as in dora_linear."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, weight_fn=weight_fn)
    dtype = torch.get_autocast_dtype(device_type)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        lora_A, lora_B, magnitude = lora_A.to(dtype), lora_B.to(dtype), magnitude.to(dtype)
    cast_fn = None if weight_fn is None else (lambda: weight_fn().to(dtype))
    with torch.autocast(device_type, enabled=False):
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, weight_fn=cast_fn)


def added_call(base, x, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
    """lora_add with autocast honoured the way the adapter's own nn.Linear modules would honour it.

    `base` is the base layer's output, already computed under whatever autocast was on (so its dtype is
    the autocast dtype for an nn.Linear, and whatever a custom module chose otherwise); it is kept as
    given. Under autocast, x goes to the autocast dtype, as lora_A(x) would cast it, and adapter weights
    follow fused_call's rule. The sum is rounded once, to base's dtype.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return lora_add(base, x, lora_A, lora_B, scaling, dropout_p)
    dtype = torch.get_autocast_dtype(device_type)
    x = x.to(dtype)
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return lora_add(base, x, lora_A, lora_B, scaling, dropout_p)


class LoRALinear(nn.Module):
    """A frozen `base_layer` (nn.Linear, in_features K, out_features N) with a LoRA update.

    Parameters: lora_A (r, K) and lora_B (N, r), trainable; the base layer's weight (N, K) and bias
    (N,) are frozen. Adapter weights are float32 whatever the base dtype (PEFT's default: a bf16 base
    keeps fp32 adapters); model.to(dtype) casts them like any other parameter.

    init_lora_weights (PEFT's names): True, A kaiming-uniform (a=√5) and B zeros, so the layer starts
    as the base layer; "gaussian", A normal with std 1/r and B zeros; False, both random as nn.Linear
    initialises them (the update is not zero: for tests).

    use_dora=True makes it PEFT's DoRA layer: a trainable magnitude vector lora_magnitude_vector (N,),
    initialised to the row norms ‖W + s·B·A‖ (so the layer starts as the LoRA layer), and the forward
    m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row through fusedlora.dora_linear.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True, use_dora: bool = False):
        super().__init__()
        if not is_plain_linear(base_layer):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        check_lora_options(r, lora_alpha, lora_dropout, use_rslora)
        check_init_lora_weights(init_lora_weights)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.set_options(lora_alpha, lora_dropout, use_rslora)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))
        self.use_dora = bool(use_dora)
        self.lora_magnitude_vector = (nn.Parameter(torch.empty(self.out_features, device=device)) if self.use_dora
                                      else None)
        self._merged = False
        self._merged_norm = None
        self.reset_lora_parameters(init_lora_weights)

    def set_options(self, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        """Change alpha, dropout and rslora (a loaded adapter brings its own); r is fixed by the shapes."""
        set_lora_options(self, lora_alpha, lora_dropout, use_rslora)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        init_lora_factors(self.lora_A, self.lora_B, self.r, init_lora_weights)
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """DoRA's row norms ‖W + s·B·A‖, (out_features,) in the adapters' dtype, from the unmerged weight."""
        weight = self.base_layer.weight
        if self._merged:
            return self._merged_norm
        return dora_weight_norm(weight.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads `layer.weight` (dtype checks, tied weights)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """True while scaling·B·A is folded into the base weight (forward then runs the base alone)."""
        return self._merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (*, in_features) -> (*, out_features), in x's dtype."""
        if self._merged:
            return self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        if self.use_dora:
            return dora_call(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                             self.lora_magnitude_vector, self.scaling, p)
        return fused_call(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                          self.scaling, p)

    def delta_weight(self) -> torch.Tensor:
        """scaling·B·A, (out_features, in_features), in float32 (or wider, if the adapters are)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling·B·A into the base weight. Refused, leaving the weight as it was, when the sum
        has a NaN or an Inf (a broken adapter, or one too large for the base dtype)."""
        if self._merged:
            raise RuntimeError("LoRALinear.merge: already merged; call unmerge() first")
        weight = self.base_layer.weight
        delta = self.delta_weight()
        merged = weight.to(delta.dtype) + delta
        if self.use_dora:  # W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row; the norm is kept for unmerge
            norm = self.weight_norm().detach()
            merged = merged * (self.lora_magnitude_vector.to(delta.dtype) / norm.to(delta.dtype))[:, None]
        merged = merged.to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"LoRALinear.merge: the merged weight (shape {tuple(weight.shape)}, {weight.dtype}) "
                             "would hold NaN or Inf values; the adapter is broken or too large for the base dtype")
        weight.copy_(merged)
        self._merged_norm = norm if self.use_dora else None
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scaling·B·A from the base weight again. In fp32 this restores the weight to a few
        ulps; in bf16 or fp16 the rounding of the merge is not undone exactly (PEFT behaves the same)."""
        if not self._merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        weight = self.base_layer.weight
        delta = self.delta_weight()
        merged = weight.to(delta.dtype)
        if self.use_dora:
            merged = merged / (self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm.to(delta.dtype))[:, None]
        weight.copy_((merged - delta).to(weight.dtype))
        self._merged, self._merged_norm = False, None

    def extra_repr(self) -> str:
        rslora = ", use_rslora=True" if self.use_rslora else ""
        dora = ", use_dora=True" if self.use_dora else ""
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}{rslora}{dora}, merged={self._merged}")
