"""Multi-process training through torch.distributed, launched by torchrun or by --multiple_gpus
(utils/launch.py). Every function also works in a plain single process (no group).

    torchrun --nproc_per_node=K main.py DATAPATH RESPATH ...                       # one machine
    torchrun --nnodes=M --node_rank=i --nproc_per_node=K \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 main.py DATAPATH RESPATH ...
                                                                          # on M machines

Ranks differ only in which slice of each global batch they load and in who writes files (rank 0).
Every rank applies every state update. The gradient of the NT-Xent loss equals that of one process
holding the whole global batch:
  - each rank scores its own 2b anchors against the 2bW views gathered from all W ranks with
    the functional collective `all_gather_single_autograd`, whose backward (a reduce-scatter)
    sums the embedding gradients that every rank's loss sends to this rank's embeddings;
  - DDP averages parameter gradients over ranks, and the mean of the W per-rank losses (each a
    mean over 2b anchors) is the global mean over 2bW anchors;
  - BatchNorm statistics are computed over the global batch by `GlobalBatchNorm`, whose sums
    are reduced with the differentiable functional collective `all_reduce` (on every device:
    nn.SyncBatchNorm is not implemented on the CPU, and on CUDA it waits for the GPU once per
    layer, on a boolean-mask index of the gathered counts).
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from utils.errors import UserError
from utils.launch import launched_by_torchrun

# Set to 1 to let more processes than GPUs share the GPUs (gloo), see setup().
SHARE_GPUS_ENV = "SIMCLR_TOOLKIT_SHARE_GPUS"


def setup(cuda, timeout_minutes=30):
    """Join the process group described by torchrun's environment; returns the device to use.

    Single process (no WORLD_SIZE > 1): no group, device cuda (UserError without CUDA) or cpu.
    Under torchrun or --multiple_gpus: backend NCCL with `-c` (device cuda:LOCAL_RANK), else
    gloo on the CPU. With `-c`, SIMCLR_TOOLKIT_SHARE_GPUS=1 and more processes on this machine
    than GPUs (`gpus_shared`), the processes share the GPUs (cuda:LOCAL_RANK mod GPUs) through
    gloo on CUDA tensors, as NCCL takes one process per GPU: slow, a way to run the
    multi-process path on a machine of one GPU (tools/gpu_check.py does).
    """
    if not launched_by_torchrun():
        if cuda and not torch.cuda.is_available():
            raise UserError("-c asks for CUDA but no CUDA device is available; run without -c "
                            "to use the CPU")
        return torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise UserError("-c asks for CUDA but no CUDA device is available on this machine; "
                            "run without -c to train on the CPU (gloo)")
        gpus = torch.cuda.device_count()
        shared = gpus_shared(gpus)
        if local_rank >= gpus and not shared:
            raise UserError(f"local rank {local_rank} has no GPU: this machine has {gpus}; use "
                            f"--nproc_per_node={gpus} or fewer (or, to test, "
                            f"{SHARE_GPUS_ENV}=1: processes share GPUs through gloo, slowly)")
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if shared:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def gpus_shared(gpus):
    """Whether the processes on this machine share its `gpus` GPUs: SIMCLR_TOOLKIT_SHARE_GPUS=1
    and more of them (torchrun's LOCAL_WORLD_SIZE) than GPUs. Every process decides alike."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return os.environ.get(SHARE_GPUS_ENV) == "1" and local > gpus


def run_in_process_group(train, args):
    """train(args, device) on this process's device (`setup(args.cuda)`), leaving the process
    group afterwards, whatever happens."""
    device = setup(args.cuda)
    try:
        return train(args, device)
    finally:
        cleanup()


def cleanup():
    """Leave the process group (no-op in a single process)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only (every rank computes the same global figures)."""
    if is_main_process():
        print(*args, **kwargs)


def barrier():
    if is_distributed():
        dist.barrier()


def _lost_peer(err):
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"rank {get_rank()} lost contact with another process of this job "
                     f"({first_line[:200]}); see that process's message above. The last "
                     f"checkpoint in RESPATH is intact: fix the cause and run the same command "
                     f"to resume")


def decide_on_main(fn):
    """Run `fn()` on rank 0 only and return its result on every rank.

    A UserError raised by `fn` on rank 0 is raised on every rank (rank 0 alone prints it), so a
    problem found while reading a checkpoint stops the whole job instead of leaving the other
    ranks waiting. The result travels pickled (checkpoints included), so RESPATH need only be
    readable from the machine of rank 0.
    """
    if not is_distributed():
        return fn()
    message = [None, None]
    if is_main_process():
        try:
            message = [fn(), None]
        except UserError as err:
            message = [None, str(err)]
    try:
        dist.broadcast_object_list(message, src=0)
    except (RuntimeError, dist.DistError) as err:
        raise _lost_peer(err) from None
    if message[1] is not None:
        raise UserError(message[1], all_ranks=True)
    return message[0]


def check_same_on_all_ranks(value, what):
    """UserError unless every rank passes the same `value` (e.g. the number of images found)."""
    if not is_distributed():
        return
    values = [None] * get_world_size()
    try:
        dist.all_gather_object(values, value)
    except (RuntimeError, dist.DistError) as err:
        raise _lost_peer(err) from None
    if any(v != values[0] for v in values):
        raise UserError(f"the processes disagree on {what}: {values} (by rank); every machine "
                        f"needs the same DATAPATH contents", all_ranks=True)


def all_reduce_mean(tensor):
    """Mean of a (small, detached) tensor over ranks; the identity in a single process.

    A failed peer turns into a UserError saying so instead of a collective's stack trace.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    try:
        dist.all_reduce(tensor)
    except (RuntimeError, dist.DistError) as err:
        raise _lost_peer(err) from None
    return tensor / get_world_size()


def all_reduce_sum(tensor):
    """Sum of a (small, detached) tensor over ranks without a host transfer (the collective
    runs on the device's stream); the identity in a single process."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    try:
        dist.all_reduce(tensor)
    except (RuntimeError, dist.DistError) as err:
        raise _lost_peer(err) from None
    return tensor


def gather_with_grad(u):
    """All-gather `u` (n, D) from every rank: returns (all (nW, D), offset of this rank's rows).

    The backward of the autograd all-gather sums, over ranks, the gradients that each rank's
    loss sends to this rank's rows (reduce-scatter), so every anchor's loss reaches the
    embeddings it depends on. Single process: (u, 0).
    """
    if not is_distributed():
        return u, 0
    gathered = funcol.all_gather_single_autograd(u.contiguous(), 0, dist.group.WORLD)
    return funcol.wait_tensor(gathered), get_rank() * u.shape[0]


def _sum_with_grad(tensor):
    """All-reduce sum whose backward is the all-reduce sum of the gradients."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", dist.group.WORLD))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, on any device, with no host-device sync.

    Same parameters, buffers and state-dict keys as BatchNorm1d/2d. In training mode with a
    process group, per channel over all ranks' (N, C, *) inputs:
        count, mean = sum(x) / count     (one all_reduce of [sum(x), count])
        var = sum((x - mean)^2) / count  (a second all_reduce; biased)
        y = (x - mean) / sqrt(var + eps) * weight + bias
    the sums in float64 on the CPU (as BatchNorm's CPU kernel accumulates) and float32 on
    CUDA. The running statistics get the unbiased var = var * count / (count - 1), as
    BatchNorm does. The reductions use the differentiable all_reduce, so the backward is
    exactly that of one BatchNorm over the concatenated batch. Otherwise a plain BatchNorm.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # float64 on the CPU: a channel whose std is tiny against its mean loses its digits in
        # float32 sums there (seen: 0.6 % gradient error); CUDA's BatchNorm sums in float32
        xf = x.double() if x.device.type == "cpu" else x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=xf.dtype, device=x.device)
        sums = _sum_with_grad(torch.cat([xf.sum(dims), count]))
        mean, count = sums[:-1] / sums[-1], sums[-1]
        centred = xf - mean.view(shape)
        var = _sum_with_grad(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)  # momentum None (cumulative average) reads the count
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))


def convert_batchnorm(module, device):
    """Replace every BatchNorm of `module` by GlobalBatchNorm on `device`, holding the same
    parameter and buffer tensors (as nn.SyncBatchNorm.convert_sync_batchnorm does)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=device)
        # the same Parameter and buffer objects: an optimizer built before keeps updating them
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(new, name, buffer)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device))
    return module


def wrap_model(model, device, sync_bn):
    """DistributedDataParallel around `model` (global-batch BatchNorm unless sync_bn is False);
    the model itself in a single process."""
    if not is_distributed():
        return model
    if sync_bn:
        model = convert_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
