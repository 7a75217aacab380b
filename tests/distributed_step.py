"""One training step under torchrun, under --multiple_gpus or in one process, for
tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed_step.py OUT.pt [options]
    python tests/distributed_step.py OUT.pt --multiple_gpus --nproc 2 [options]
    python tests/distributed_step.py OUT.pt [options]          # the one-process reference
    distributed_step.main(["OUT.pt", *options])                 # the same, in the caller
    torchrun ... tests/distributed_step.py A.pt [options] --then B.pt [options] ...

Steps joined by --then run one after the other in the same processes (one launch, one process
group), each from its own freshly built, seeded model and batch, into its own file; launcher
flags (--multiple_gpus, --nproc) go with the first.

Every process builds the same model and the same global batch (seeded), takes its slice of it
(rank r: images r*B/W .. (r+1)*B/W, both views for SimCLR), runs the step the engine runs for
--task (simclr: `simclr.forward_backward`; finetune, segment: the script's Task.step, on labels
and, for segmentation, ignored pixels spread unevenly over the ranks), and rank 0 saves the
global loss and the averaged parameter gradients.
--negatives local and --gather-grad local reproduce two bugs of other implementations, and
--pixel-mean per-rank the per-process mean over pixels of a plain segmentation loss, so the
test can show that its comparison catches them.
"""
import argparse
import functools
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclr import forward_backward  # noqa: E402
from utils.engine import Trainer  # noqa: E402
from utils.distributed import (all_reduce_mean, cleanup, gather_with_grad, get_rank,  # noqa: E402
                               get_world_size, setup, wrap_model)
from utils.launch import launch_workers, wants_launch  # noqa: E402
from utils.model import build_encoder, build_model  # noqa: E402
from utils.ntxent import NTXentLoss  # noqa: E402
from utils.precision import FLOAT32  # noqa: E402


def gather_without_grad_sum(u):
    """The common wrong gather: other ranks' rows are constants and this rank's rows get only
    the gradient of this rank's own loss (no sum over ranks)."""
    parts = [torch.empty_like(u) for _ in range(get_world_size())]
    dist.all_gather(parts, u.detach().contiguous())
    parts[get_rank()] = u
    return torch.cat(parts), get_rank() * u.shape[0]


def build_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=8, help="global batch (images)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--norm", choices=("batch", "group", "eval-batch"), default="batch")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--negatives", choices=("global", "local"), default="global")
    parser.add_argument("--gather-grad", choices=("sum", "local"), default="sum")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--task", choices=("simclr", "finetune", "segment"), default="simclr")
    parser.add_argument("--pixel-mean", choices=("global", "per-rank"), default="global")
    parser.add_argument("--multiple_gpus", action="store_true")
    parser.add_argument("--nproc", type=int, default=None)
    parser.set_defaults(cuda=False)
    return parser


def split_steps(argv):
    """The argument lists of the steps that --then separates."""
    steps = [[]]
    for arg in argv:
        if arg == "--then":
            steps.append([])
        else:
            steps[-1].append(arg)
    return steps


def main(argv=None):
    """argv: the command line's arguments (default sys.argv[1:]); a caller that is not under
    torchrun gets the one-process reference in its own process."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    steps = [parser.parse_args(step) for step in split_steps(argv)]
    if wants_launch(steps[0]):
        sys.exit(launch_workers(steps[0], os.path.abspath(__file__), argv))

    device = setup(cuda=False)
    try:
        for args in steps:
            if args.task != "simclr":
                supervised_step(args, device)
            else:
                simclr_step(args, device)
    finally:
        cleanup()


def simclr_step(args, device):
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
    save_result(args, model, loss)


def save_result(args, model, loss):
    """Rank 0 writes the global loss, the (DDP-averaged) gradients and the buffers."""
    rank, world = get_rank(), get_world_size()
    loss = all_reduce_mean(loss.detach().view(1))
    plain = model.module if hasattr(model, "module") else model
    grads = {name: p.grad.detach().clone() for name, p in plain.named_parameters()}
    buffers = {name: t.detach().clone() for name, t in plain.named_buffers()}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "buffers": buffers, "world_size": world},
                   args.out)


def supervised_step(args, device):
    """One step of finetune.py's or segment.py's task (float64) on this rank's slice of a
    seeded global batch of 8 images with 3 classes."""
    import finetune
    import segment
    from utils.segmentation import build_segmentation_net
    rank, world = get_rank(), get_world_size()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if args.task == "finetune":
        encoder, feat_dim = build_encoder("resnet18", 1, "cifar")
        model = finetune.Classifier(encoder, finetune.build_head("mlp", feat_dim, 3))
        x = torch.randn(args.batch, 1, 8, 8, generator=generator)
        y = torch.randint(0, 3, (args.batch,), generator=generator)
        task = finetune.FinetuneTask(types.SimpleNamespace(freeze=False), "train", None, device)
    else:
        model = build_segmentation_net("resnet18", 1, "cifar", 3, "unet", False)
        x = torch.randn(args.batch, 1, 16, 16, generator=generator)
        y = torch.randint(0, 3, (args.batch, 16, 16), generator=generator)
        # image i has i/8 of its pixels ignored: the ranks hold different numbers of labels
        ignored = torch.rand(args.batch, 16, 16, generator=generator) < (
            torch.arange(args.batch) / args.batch).view(-1, 1, 1)
        y[ignored] = 255
        task = segment.SegmentationTask(types.SimpleNamespace(
            ignore_index=255, freeze=False, channels_last=False), "train", 3, None, device)
    model = wrap_model(model.to(dtype), device, args.sync_bn)
    model.train()
    b = args.batch // world
    mine = slice(rank * b, (rank + 1) * b)
    trainer = types.SimpleNamespace(model=model, precision=FLOAT32, device=device,
                                    settings=types.SimpleNamespace(channels_last=False))
    trainer.images_and_targets = functools.partial(Trainer.images_and_targets, trainer)
    all_reduce_sum = segment.all_reduce_sum
    if args.task == "segment" and args.pixel_mean == "per-rank":
        segment.all_reduce_sum = lambda t: t  # count this rank's valid pixels only
    try:
        loss, _ = task.step(trainer, (x[mine].to(dtype), y[mine]), 0)
    finally:
        segment.all_reduce_sum = all_reduce_sum  # the next step (--then) counts them all
    save_result(args, model, loss)


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
