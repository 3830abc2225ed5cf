"""A tiny Llama built from a config (no downloads) and the runs the module and PEFT tests compare.

Two layers (or `layers`), hidden 64, intermediate 128, 4 heads (2 key/value heads), vocabulary 128, random biases
on every projection (so bias="lora_only" has something to train), 2 sequences of 8 tokens: one
forward and backward through the interpreter takes a few seconds.
"""
import contextlib
import copy
import warnings

import torch
from oracle import assert_normwise, check_lora_linear
from transformers import LlamaConfig, LlamaForCausalLM

# Where the models run: on CUDA when present (the kernels proper), else on CPU (the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TARGETS = 2 * len(TARGETS)
VOCAB = 128


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         attention_bias=True, mlp_bias=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # transformers starts biases at zero, which would hide a bias left out
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model.to(device=DEVICE, dtype=dtype).eval()


def tokens(seed: int = 0, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def canonical(name: str) -> str:
    """A parameter name without PEFT's wrapping, so that PEFT and fusedlora models compare by name:
    base_model.model.x.q_proj.lora_A.default.weight -> x.q_proj.lora_A."""
    name = name.removeprefix("base_model.model.")
    for half in ("lora_A", "lora_B"):
        name = name.replace(f".{half}.default.weight", f".{half}")
    return name


def run(model, ids, seed: int = 0):
    """Logits, and the gradient of every trainable parameter (by canonical name) for a fixed random
    weighting of the logits."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    (out.double() * weights).sum().backward()
    grads = {canonical(name): p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), "every trainable parameter needs a gradient"
    return out.detach(), grads


def oracle_runs(reference, ids):
    """`reference` run in float64 (the exact answer) and in its own dtypes (the error to beat)."""
    return run(copy.deepcopy(reference).double(), ids), run(reference, ids)


def assert_run_matches(got, runs, dtype, lora_grads: int):
    """Logits and every gradient of `got` (a run) against the float64 run, by the norm-wise rule of
    tests/oracle.py with the same-dtype run as the reference error."""
    (y64, g64), (y_low, g_low) = runs
    y, g = got
    assert y.dtype == y_low.dtype == dtype
    assert sorted(g) == sorted(g64)
    assert sum(".lora_" in name for name in g) == lora_grads
    for name in g64:
        assert g[name].dtype == g_low[name].dtype, name
    assert_normwise(dict(logits=y, **g), dict(logits=y_low, **g_low), dict(logits=y64, **g64))


def assert_training_lowers_loss(model, steps: int = 4):
    """A few AdamW steps in training mode (dropout on) lower the language-model loss in eval mode."""
    ids = tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = model.eval()(input_ids=ids, labels=ids).loss.item()
    assert final < losses[0] - 0.1, (losses, final)


@contextlib.contextmanager
def recording_layers(model):
    """{layer name: {"x", "y", then after backward "dy" and "dx"}} of each PEFT LoRA layer's last call in
    the block, through the layer's own (module-level) hooks, which the patched forward ignores."""
    records, handles = {}, []
    for name, layer in model.named_modules():
        if not (hasattr(layer, "lora_A") and hasattr(layer, "base_layer")):
            continue

        def forward_hook(layer, args, y, name=name):
            records[name] = dict(x=args[0].detach(), y=y.detach())

        def backward_hook(layer, grad_input, grad_output, name=name):
            records[name].update(dy=grad_output[0], dx=grad_input[0])

        handles += [layer.register_forward_hook(forward_hook), layer.register_full_backward_hook(backward_hook)]
    try:
        with warnings.catch_warnings():
            # Layer 0's q/k/v take hidden states that need no gradient: no dx to record, dy still comes.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            yield records
    finally:
        for handle in handles:
            handle.remove()


def assert_layers_compute_lora(model, records, torch_ops=False, autocast=None):
    """Each recorded layer, on the very input it got inside the model run, computed PEFT's function of its
    one active adapter: its output and the gradients of x and of every trainable tensor of the layer, for
    the cotangent it got, by the componentwise rule (tests/oracle.py). The whole-model rule measures every
    tensor against PEFT's own error, which compounds through the model; here nothing upstream counts, so
    a low-rank term off by one percent (a wrong scaling) cannot hide in it: with fp32 adapters under a bf16
    base, dA and dB come out in fp32 and the rule allows them about n·2^-24 of their magnitude.
    autocast: the dtype the records were made under; the layer then computes on x, W and b cast to it
    (and on the adapters as they are when fp32), as nn.Linear would cast them, and x's gradient is that
    of the cast, which is exact."""
    layers = dict(model.named_modules())
    assert records, "no LoRA layer ran"
    for name, rec in records.items():
        layer = layers[name]
        (adapter,) = layer.active_adapters
        base, A, B = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
        assert B.bias is None and float(getattr(layer.lora_dropout[adapter], "p", 0.0)) == 0.0, \
            f"{name}: the per-layer check knows plain LoRA without dropout or lora_bias"
        inputs = dict(x=rec["x"], weight=base.weight.detach(),
                      bias=None if base.bias is None else base.bias.detach(),
                      lora_A=A.weight.detach(), lora_B=B.weight.detach())
        if autocast is not None:
            adapters_too = A.weight.dtype != torch.float32 or B.weight.dtype != torch.float32
            inputs = {n: t if t is None or (n.startswith("lora_") and not adapters_too) else t.to(autocast)
                      for n, t in inputs.items()}
        grads = {n: t.grad for n, t in (("weight", base.weight), ("bias", base.bias),
                                       ("lora_A", A.weight), ("lora_B", B.weight))
                 if t is not None and t.requires_grad}
        if rec.get("dx") is not None:
            grads["x"] = rec["dx"].to(inputs["x"].dtype)
        if "dy" not in rec:  # a forward without backward
            grads = None
        try:
            check_lora_linear(rec["y"], grads, inputs, float(layer.scaling[adapter]), None, 0.0,
                              dy=rec.get("dy"), torch_ops=torch_ops)
        except AssertionError as e:
            raise AssertionError(f"layer {name}: {e}") from None
