"""A small model whose layers call fusedlora.lora_linear, for the compile and distributed tests.

LoRALayer stands in for fusedlora's LoRALinear module (issue 3) until it lands. It has the same
parameters as a LoRA layer (a frozen weight and bias, trainable lora_A and lora_B), so once
LoRALinear lands, replacing LoRALayer in make_model is a one-line change.
"""
import torch
from torch import nn

import fusedlora


class LoRALayer(nn.Module):
    def __init__(self, in_features, out_features, r, alpha, dropout, generator):
        super().__init__()

        def rnd(*shape, scale):
            return torch.randn(*shape, generator=generator) * scale

        self.weight = nn.Parameter(rnd(out_features, in_features, scale=in_features ** -0.5),
                                   requires_grad=False)
        self.bias = nn.Parameter(rnd(out_features, scale=0.1), requires_grad=False)
        self.lora_A = nn.Parameter(rnd(r, in_features, scale=in_features ** -0.5))
        # Not PEFT's zero init: a zero lora_B would leave lora_A's gradient zero in the first step.
        self.lora_B = nn.Parameter(rnd(out_features, r, scale=0.1 * r ** -0.5))
        self.scaling = alpha / r
        self.dropout = dropout

    def forward(self, x):
        return fusedlora.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                     self.dropout if self.training else 0.0)


DIMS = (32, 48, 24)


def make_model(dropout=0.25, r=4, seed=0):
    """LoRALayer(32 -> 48), ReLU, LoRALayer(48 -> 24); the same weights for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    first, second = (LoRALayer(a, b, r, 2 * r, dropout, gen) for a, b in zip(DIMS, DIMS[1:]))
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
