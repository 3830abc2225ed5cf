"""CallPlan: what the plans layer builds for one call specialization, and every call of it runs.

The ops layer keys each call (fusedlora/core/specialization.py), looks its plan up, builds it on a miss
(the build runs the checks, picks the backend and the plan, binds the launches) and runs it. A plan
holds no tensor: each call passes its own.
"""
from fusedlora.core.specialization import TENSOR, Signature

# The specialization of the gradient a backward is given (y.sum().backward() passes a stride-0 one), with
# the settings at backward time: a plan's backward binds its launches once per key of it.
DY = Signature("backward", dy=TENSOR)


class CallPlan:
    """The checked and decided launch sequence of one call specialization.

    A call without gradients, or one whose gradients torch's autograd takes through torch ops (the
    PyTorch backend), runs
        run(*args) -> out
    A call with gradients runs, through its op's autograd Function,
        forward(*args) -> (out, saved, state)   saved: the tensors backward needs; state: plain values
        backward(dy, saved, state, needs) -> one gradient per argument (None where `needs` has False)
    *args are the op's public arguments in order. Each plan file says what its saved and state hold."""

    __slots__ = ("run", "forward", "backward")

    def __init__(self, run=None, forward=None, backward=None):
        if (run is None) == (forward is None) or (forward is None) != (backward is None):
            raise ValueError("a CallPlan has run, or forward and backward")
        self.run, self.forward, self.backward = run, forward, backward

    def __repr__(self) -> str:
        return f"CallPlan({'run' if self.run is not None else 'forward, backward'})"


def with_contiguous(plan: CallPlan, args, positions) -> CallPlan:
    """plan, or a plan that passes a contiguous copy of each argument at `positions` that is not
    contiguous in `args` (the build's arguments): vectors the kernels index without a stride (a bias,
    scalings, ranks). A contiguous argument costs nothing: the key holds its strides, so a call whose
    argument is strided has a plan of its own."""
    strided = tuple(i for i in positions if args[i] is not None and not args[i].is_contiguous())
    if not strided:
        return plan

    def fixed(args):
        args = list(args)
        for i in strided:
            args[i] = args[i].contiguous()
        return args

    if plan.run is not None:
        run = plan.run
        return CallPlan(run=lambda *args: run(*fixed(args)))
    forward = plan.forward
    return CallPlan(forward=lambda *args: forward(*fixed(args)), backward=plan.backward)
