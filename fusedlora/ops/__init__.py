"""The ops: eager autograd Functions and the torch.compile custom ops, single- and multi-adapter,
each calling the plan the planner picks. Imports fusedlora.plans and fusedlora.core."""
