"""Support shared by every layer above: input checks, the dropout mask, backend choice, the PyTorch
backend, the adapter-batch object and the float64-capable PyTorch reference (the tests' oracle).
Imports nothing of fusedlora's outside this folder except fusedlora.kernels."""
