"""Two-process training of the test model under DDP and under FSDP2, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/distributed_train.py OUT.safetensors

On the CPU with the gloo backend. Each wrapper trains make_model() for STEPS steps of SGD; at step
s rank r takes its shard of the global batch and seeds torch with step_seed(s, r) before its forward,
so its layers draw their own dropout seeds. Rank 0 writes, per wrapper and step, the global loss
(the mean of the ranks' losses) and the full gradients, then the final trainable parameters.
single_process() is the same training in one process: the ranks' shards in turn, gradients summed.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fusedlora import LoRALinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_model import adapter_grads, make_batch, make_model, mse  # noqa: E402

STEPS, ROWS_PER_RANK, WORLD, LR = 3, 4, 2, 0.05


def step_seed(step, rank):
    return 100 * step + rank


def shard(step, rank):
    x, target = make_batch(WORLD * ROWS_PER_RANK, seed=step)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return x[rows], target[rows]


def full(t):
    """The whole tensor from an FSDP2 shard (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(model, forward, reduce_loss):
    """STEPS steps of SGD on the trainable parameters of `model`, run through `forward`, with
    reduce_loss(per-process loss) -> global loss. Returns {key: tensor} as written to the file."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    record = {}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        record[f"step{step}.loss"] = reduce_loss(step, forward)
        for name, grad in adapter_grads(model).items():
            record[f"step{step}.{name}.grad"] = full(grad).detach().clone()
        opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            record[f"final.{name}"] = full(p).detach().clone()
    return record


def single_process():
    """The reference: both ranks' shards in one process, each loss halved, gradients accumulated."""
    def reduce_loss(step, forward):
        total = 0.0
        for rank in range(WORLD):
            x, target = shard(step, rank)
            torch.manual_seed(step_seed(step, rank))
            loss = mse(forward(x), target) / WORLD
            loss.backward()
            total = total + loss.detach()
        return total

    model = make_model()
    return train(model, model, reduce_loss)


def distributed(wrap):
    rank = dist.get_rank()

    def reduce_loss(step, forward):
        x, target = shard(step, rank)
        torch.manual_seed(step_seed(step, rank))
        loss = mse(forward(x), target)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / WORLD

    model = make_model()
    return train(model, wrap(model), reduce_loss)


def ddp(model):
    return DistributedDataParallel(model)


def fsdp2(model):
    for layer in model:
        if isinstance(layer, LoRALinear):
            fully_shard(layer)
    return fully_shard(model)


def write_record(record, out_path):
    """Written under a temporary name and renamed into place, so the file at out_path is either
    absent or whole: its presence is what tells the test that training finished."""
    from safetensors.torch import save_file

    partial = f"{out_path}.partial"
    save_file({k: t.contiguous() for k, t in record.items()}, partial)
    os.replace(partial, out_path)


def main(out_path):
    dist.init_process_group("gloo")
    assert dist.get_world_size() == WORLD
    record = {}
    for name, wrap in (("ddp", ddp), ("fsdp2", fsdp2)):
        record.update({f"{name}.{key}": t for key, t in distributed(wrap).items()})
    if dist.get_rank() == 0:
        write_record(record, out_path)
    # No rank leaves before rank 0 has written: torchrun kills the other workers as soon as one
    # fails, so rank 1 failing on its way out must not be able to cut rank 0 short of the record.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # The interpreter's teardown in a process that has run gloo now and then aborts the process
    # (SIGABRT, "terminate called without an active exception"), even for a plain nn.Linear under
    # DDP. The work is done and written, and the OS reclaims everything else, so leave without
    # that teardown; os._exit skips flushing Python's buffers, hence the explicit flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
