"""A small model of fusedlora.LoRALinear layers, for the compile and distributed tests."""
import torch
from torch import nn

import fusedlora


def lora_layer(in_features, out_features, r, alpha, dropout, generator):
    """A LoRALinear over a fresh nn.Linear, every weight drawn from `generator` (the module's own
    initialisation draws from torch's global one)."""
    layer = fusedlora.LoRALinear(nn.Linear(in_features, out_features), r, alpha, dropout)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=generator) * scale

    with torch.no_grad():
        layer.base_layer.weight.copy_(rnd(out_features, in_features, scale=in_features ** -0.5))
        layer.base_layer.bias.copy_(rnd(out_features, scale=0.1))
        layer.lora_A.copy_(rnd(r, in_features, scale=in_features ** -0.5))
        # Not PEFT's zero init: a zero lora_B would leave lora_A's gradient zero in the first step.
        layer.lora_B.copy_(rnd(out_features, r, scale=0.1 * r ** -0.5))
    return layer


DIMS = (32, 48, 24)


def make_model(dropout=0.25, r=4, seed=0):
    """LoRALinear(32 -> 48), ReLU, LoRALinear(48 -> 24); the same weights for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    first, second = (lora_layer(a, b, r, 2 * r, dropout, gen) for a, b in zip(DIMS, DIMS[1:]))
    return nn.Sequential(first, nn.ReLU(), second)


def make_batch(rows, seq=5, seed=0):
    """(x: (rows, seq, 32), target: (rows, seq, 24))."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(rows, seq, DIMS[0], generator=gen), torch.randn(rows, seq, DIMS[-1], generator=gen)


def mse(y, target):
    return (y - target).square().mean()


def adapter_grads(model):
    """{parameter name: gradient} for the trainable parameters, in a fixed order."""
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
