"""The one call path every op takes: its plan by key, built on a miss, and the autograd Function that runs
a plan with gradients.

    key = SIGNATURE.key(*args)                    fusedlora/core/specialization.py
    plan = SIGNATURE.plans.get(key) or planned(SIGNATURE, key, build, args)
    plan.run(*args)  or  PlannedCall.apply(plan, *args)

The first call of a specialization builds its plan (the build runs the checks: bad input raises there,
before any launch) and every later call runs the plan it finds. Under torch.compile an op calls its
custom op instead, whose body does the same with the tensors it is given.
"""
import torch


def planned(signature, key, build, args, needs=None):
    """The plan for a call whose key missed: built by `build(*args, needs)` and kept under key (a call
    that could not be keyed gets a plan of its own, whose build's checks say what is wrong)."""
    if key is not None:
        needs = key[0]
    elif needs is None:
        needs = signature.needs(*args)
    return signature.plans.keep(key, build(*args, needs))


class PlannedCall(torch.autograd.Function):
    """Any op's call with gradients: the plan's forward, and its backward with what forward saved.
    `PlannedCall.apply(plan, *args)`; the plan returns one gradient per argument."""

    @staticmethod
    def forward(ctx, plan, *args):
        out, saved, state = plan.forward(*args)
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.state = plan, state
        return out

    @staticmethod
    def backward(ctx, dy):
        return (None, *ctx.plan.backward(dy, ctx.saved_tensors, ctx.state, ctx.needs_input_grad[1:]))
