"""fusedlora: fused Triton kernels for LoRA linear layers."""
from fusedlora import reference
from fusedlora.dropout import dropout_mask
from fusedlora.functional import lora_linear
from fusedlora.multi import multi_lora_linear

__all__ = ["lora_linear", "multi_lora_linear", "dropout_mask", "reference"]
__version__ = "0.1.0"
