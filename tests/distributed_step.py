"""One SimCLR training step under torchrun (or in one process), for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed_step.py OUT.pt [options]
    python tests/distributed_step.py OUT.pt [options]          # the one-process reference

Every process builds the same model and the same global batch (seeded), takes its slice of it
(rank r: images r*B/W .. (r+1)*B/W, both views), runs `simclr.forward_backward` exactly as the
training loop does, and rank 0 saves the global loss and the averaged parameter gradients.
--negatives local and --gather-grad local reproduce two bugs of other implementations, so the
test can show that its comparison catches them.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclr import forward_backward  # noqa: E402
from utils.distributed import (all_reduce_mean, cleanup, gather_with_grad, get_rank,  # noqa: E402
                               get_world_size, setup, wrap_model)
from utils.model import build_model  # noqa: E402
from utils.ntxent import NTXentLoss  # noqa: E402


def gather_without_grad_sum(u):
    """The common wrong gather: other ranks' rows are constants and this rank's rows get only
    the gradient of this rank's own loss (no sum over ranks)."""
    parts = [torch.empty_like(u) for _ in range(get_world_size())]
    dist.all_gather(parts, u.detach().contiguous())
    parts[get_rank()] = u
    return torch.cat(parts), get_rank() * u.shape[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=8, help="global batch (images)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--norm", choices=("batch", "group", "eval-batch"), default="batch")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--negatives", choices=("global", "local"), default="global")
    parser.add_argument("--gather-grad", choices=("sum", "local"), default="sum")
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()

    device = setup(cuda=False)
    rank, world = get_rank(), get_world_size()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model("resnet18", 1, "cifar", [32, 16])
    if args.norm == "group":  # per-sample normalisation: chunking is exact in training mode
        model = replace_batchnorm_by_groupnorm(model)
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(1)
    views = torch.randn(2, args.batch, 1, 8, 8, generator=generator).to(dtype)
    b = args.batch // world
    mine = views[:, rank * b:(rank + 1) * b]
    x = torch.cat([mine[0], mine[1]])  # (2b, 1, 8, 8): view 1 of my images, then view 2
    model = wrap_model(model, device, args.sync_bn)
    model.train()
    if args.norm == "eval-batch":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    gather = None
    if world > 1 and args.negatives == "global":
        gather = gather_with_grad if args.gather_grad == "sum" else gather_without_grad_sum
    criterion = NTXentLoss(0.2, gather=gather)
    loss, _ = forward_backward(model, criterion, x, args.chunk_size)
    loss = all_reduce_mean(loss.detach().view(1))
    plain = model.module if hasattr(model, "module") else model
    grads = {name: p.grad.detach().clone() for name, p in plain.named_parameters()}
    buffers = {name: t.detach().clone() for name, t in plain.named_buffers()}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "buffers": buffers, "world_size": world},
                   args.out)
    cleanup()


def replace_batchnorm_by_groupnorm(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.GroupNorm(4, child.num_features))
        elif isinstance(child, torch.nn.BatchNorm1d):
            setattr(module, name, torch.nn.LayerNorm(child.num_features))
        else:
            replace_batchnorm_by_groupnorm(child)
    return module


if __name__ == "__main__":
    main()
