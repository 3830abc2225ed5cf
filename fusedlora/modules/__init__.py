"""nn.Module layers (LoRALinear), inject() and the LoRA option rules they share. Built on the
public functions (fusedlora.functional)."""
