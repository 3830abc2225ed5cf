"""What the MoE tests share: tiny Qwen3-MoE, Mixtral and gpt-oss models built from configs (no downloads),
PEFT's LoRA on their experts' parameters, and a dispatch mode that finds the largest tensor a run makes."""
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
