"""PEFT interop: patch_peft and the forward it serves, and adapter files in PEFT's format. Built on
the public functions and fusedlora.modules."""
