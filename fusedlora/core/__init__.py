"""Support shared by every layer above: input checks, the dropout mask, backend choice, the
adapter-batch object and the float64-capable PyTorch reference. Imports nothing of fusedlora's
outside this folder except fusedlora.kernels."""
