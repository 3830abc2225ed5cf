"""Execution plans: the planner (which plan serves a call, from shapes alone) and each plan's launch
sequence over fusedlora.kernels. Imports fusedlora.core and fusedlora.kernels only."""
