"""What the MoE tests share: tiny Qwen3-MoE, Mixtral and gpt-oss models built from configs (no downloads),
PEFT's LoRA on their experts' parameters, and a dispatch mode that finds the largest tensor a run makes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensors(TorchDispatchMode):
    """Counts every op's new tensors while active, forward and backward (autograd's backward ops pass
    through the mode too): `largest` is the most elements of one output that does not share storage with
    an input (views and in-place results are not new memory), `where` the op that made it."""

    def __init__(self):
        super().__init__()
        self.largest, self.where, self.count = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
                if t.numel() > self.largest:
                    self.largest, self.where = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out

    def report(self) -> str:
        return f"largest tensor: {self.largest} elements, made by {self.where} ({self.count} outputs seen)"


FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
EXPERTS = 8
VOCAB = 64
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(family: str, layers: int = 2):
    """A tiny config of the family: hidden 64, 8 experts, top-2, expert width 32."""
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=EXPERTS,
                                           **common)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=32, num_local_experts=EXPERTS, **common)
    if family == "gpt_oss":  # its default context length: YaRN checks it against original_max_position_embeddings
        common.pop("max_position_embeddings")
        return transformers.GptOssConfig(intermediate_size=32, num_local_experts=EXPERTS, **common)
    raise ValueError(family)


def tiny_moe(family: str, seed: int = 0, dtype=torch.float32, layers: int = 2):
    """A tiny causal LM of the family with random weights scaled so that every part of the experts matters:
    expert weights ~1/√K (transformers' 0.02 would leave the experts a small share of the output), random
    expert biases (gpt-oss; transformers starts them at zero), routers that spread tokens over experts."""
    import transformers
    config = moe_config(family, layers)
    cls = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           "gpt_oss": transformers.GptOssForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                fan_in = p.shape[-1] if p.dim() == 2 else (p.shape[1] if family == "gpt_oss" else p.shape[2])
                p.normal_(std=0.1 if p.dim() == 2 else fan_in ** -0.5)
            elif name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=0.5)
    return model.to(dtype).eval()


def experts_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("mlp.experts")]


def tokens(seed: int = 0, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_moe(family: str, seed: int = 1, dtype=torch.float32, adapter_name: str = "default", **options):
    """get_peft_model with LoRA on both expert parameters of every MoE layer, A and B random (non-zero)."""
    from peft import LoraConfig, get_peft_model
    options = {"r": 4, "lora_alpha": 8, "target_parameters": TARGETS, "init_lora_weights": False, **options}
    base = tiny_moe(family, dtype=dtype)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(**options), adapter_name=adapter_name).eval()


def eager_copy(model, dtype=torch.float64):
    """A copy in `dtype` whose experts run transformers' "eager" implementation, each family's own loop
    over experts (grouped_mm has no float64 kernel): the oracle is another implementation too."""
    import copy
    twin = copy.deepcopy(model).to(dtype)
    for m in twin.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    return twin


# The expert support's own floors (fusedlora/modules/experts.py): below them (the matrix's row at the
# dense layers' floors) its tests skip, and test_compat.py checks what such releases get instead.
from fusedlora.modules.experts import versions_reason  # noqa: E402

BELOW_FLOORS = versions_reason(("transformers", "peft"))
needs_expert_floors = pytest.mark.skipif(BELOW_FLOORS is not None, reason=str(BELOW_FLOORS))
