"""fusedlora: fused Triton kernels for LoRA linear layers."""
from fusedlora.core import reference
from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.peft.adapter_io import AdapterFileError, load_adapter, read_adapter, save_adapter
from fusedlora.core.dropout import dropout_mask
from fusedlora.core.moe_routing import ExpertRouting
from fusedlora.functional import dora_linear, lora_add, lora_linear
from fusedlora.modules.inject import inject, print_trainable_parameters, trainable_parameters
from fusedlora.modules.lora_linear import LoRALinear
from fusedlora.moe import moe_lora_linear
from fusedlora.multi import multi_lora_linear
from fusedlora.peft.patch import patch_peft, unpatch_peft
from fusedlora.serving.pool import AdapterPool, MultiLoRALinear

__all__ = [
    "lora_linear", "lora_add", "dora_linear", "multi_lora_linear", "dropout_mask", "reference", "LoRALinear", "inject",
    "trainable_parameters", "print_trainable_parameters", "save_adapter", "load_adapter", "read_adapter",
    "AdapterFileError", "patch_peft", "unpatch_peft", "AdapterPool", "MultiLoRALinear", "AdapterBatch",
    "ExpertRouting", "moe_lora_linear",
]
__version__ = "0.1.0"
