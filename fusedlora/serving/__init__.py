"""Multi-tenant serving: the adapter pool and its MultiLoRALinear layers. Built on
multi_lora_linear, fusedlora.modules and the adapter files of fusedlora.peft."""
