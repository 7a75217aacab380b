"""Optimisers and the learning-rate schedule every training script uses: the peak rate scaled to
the global batch, SGD/AdamW/LARS with BatchNorm and biases excluded from weight decay, and the
rate of each step as a pure function of the step (so a resume restores a counter only)."""
import math
from dataclasses import dataclass

import torch

from utils.lars import LARS

LR_REFERENCE_BATCH = 256


@dataclass(frozen=True)
class OptimisationDefaults:
    """A training script's optimisation defaults: peak learning rate and weight decay per
    optimizer (the first optimizer is the default one), warm-up epochs, and what --lr means
    in that script (for its help)."""
    lr: dict
    weight_decay: dict
    warmup_epochs: float
    lr_means: str


# Every training script's flags --optimizer --lr --weight-decay --warmup-epochs and their
# defaults (docs/defaults.md says how they were chosen).
OPTIMISATION_DEFAULTS = {
    "main": OptimisationDefaults(
        {"sgd": 0.5, "adamw": 1e-3, "lars": 0.3}, {"sgd": 5e-4, "adamw": 1e-2, "lars": 1e-6},
        1.0, "peak learning rate per 256 images, scaled by --lr-scaling to the global batch"),
    "finetune": OptimisationDefaults(
        {"sgd": 0.1, "adamw": 1e-3, "lars": 0.1}, {"sgd": 5e-4, "adamw": 1e-2, "lars": 1e-6},
        0.0, "peak learning rate per 256 images, scaled linearly to the batch"),
    "segment": OptimisationDefaults(
        {"adamw": 1e-3, "sgd": 0.01}, {"adamw": 1e-2, "sgd": 5e-4},
        1.0, "peak learning rate (not scaled to the batch)"),
}
OPTIMIZER_HELP = {"sgd": "SGD with momentum 0.9", "adamw": "AdamW",
                  "lars": "LARS (the SimCLR paper's, for global batches of about 1024 and more)"}


def add_optimisation_args(group, script):
    """--optimizer, --lr, --weight-decay (--wd) and --warmup-epochs with `script`'s defaults
    (OPTIMISATION_DEFAULTS; lr and weight decay None until fill_optimisation_defaults)."""
    defaults = OPTIMISATION_DEFAULTS[script]
    names = tuple(defaults.lr)

    def per_optimizer(values):
        return ", ".join(f"{values[name]:g} for {name}" for name in names)

    group.add_argument("--optimizer", choices=names, default=names[0],
                       help=", ".join(OPTIMIZER_HELP[name] for name in names))
    group.add_argument("--lr", type=float, default=None,
                       help=f"{defaults.lr_means}, then cosine decay to 0 (default "
                            f"{per_optimizer(defaults.lr)})")
    group.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=None,
                       help=f"weight decay, not applied to BatchNorm and biases (default "
                            f"{per_optimizer(defaults.weight_decay)})")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs,
                       help="epochs of linear learning-rate warm-up before the cosine decay")


def fill_optimisation_defaults(args, script):
    """Set args.lr and args.weight_decay left None to `script`'s default for args.optimizer."""
    defaults = OPTIMISATION_DEFAULTS[script]
    if args.lr is None:
        args.lr = defaults.lr[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = defaults.weight_decay[args.optimizer]


def scaled_learning_rate(lr_per_256, global_batch_size, rule):
    """The peak learning rate for a global batch of B images, from a rate given per 256:
    linear: lr * B / 256;  sqrt: lr * sqrt(B / 256);  none: lr as given (SimCLR paper, B.1)."""
    ratio = global_batch_size / LR_REFERENCE_BATCH
    if rule == "linear":
        return lr_per_256 * ratio
    if rule == "sqrt":
        return lr_per_256 * math.sqrt(ratio)
    if rule == "none":
        return lr_per_256
    raise ValueError(f"unknown learning-rate scaling {rule!r}: linear, sqrt or none")


def build_optimizer(model, name, lr, weight_decay, part_rates=()):
    """SGD (momentum 0.9), AdamW or LARS (momentum 0.9, eta 0.001) over the parameters of
    `model` that require gradients; SGD and AdamW with fused kernels on CUDA
    (uses_fused_kernels).

    BatchNorm weights and biases (the 1-d tensors) get no weight decay and, with LARS, no
    trust-ratio adaptation, as in the SimCLR paper. `part_rates` holds PartRate entries: the
    parameters of each such submodule get groups of their own whose "lr_scale" and
    "start_step" the engine applies (lr of step s = schedule(s) * lr_scale once s >=
    start_step, else 0), e.g. a pretrained encoder at a tenth of the head's rate.
    """
    owner = {}
    for part in part_rates:
        owner.update({id(p): (part.lr_scale, part.start_step) for p in part.module.parameters()})
    rates = [(1.0, 0)] + [(part.lr_scale, part.start_step) for part in part_rates]
    groups = {(rate, decayed): [] for rate in rates for decayed in (True, False)}
    for param in model.parameters():
        if param.requires_grad:  # frozen parameters (fine-tuning --freeze) are not optimised
            groups[owner.get(id(param), (1.0, 0)), param.ndim > 1].append(param)
    param_groups = []
    for ((scale, start), decayed), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if (scale, start) != (1.0, 0):
            group.update(lr_scale=scale, start_step=start)
        if name == "lars" and not decayed:
            group["lars_adapt"] = False
        param_groups.append(group)
    fused = {"fused": True} if uses_fused_kernels(name, model.parameters()) else {}
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, **fused)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, **fused)
    if name == "lars":
        return LARS(param_groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name}")


def uses_fused_kernels(name, params):
    """True for SGD and AdamW when every parameter is on a CUDA device: torch's fused kernels
    update all parameters in one launch and let GradScaler unscale inside the step, where the
    default path pays one host-GPU synchronisation per fp16 step. (LARS keeps _foreach; the
    CPU keeps the default kernels.)"""
    params = list(params)
    return name in ("sgd", "adamw") and bool(params) and all(p.is_cuda for p in params)


@dataclass
class PartRate:
    """A submodule trained at `lr_scale` times the schedule's rate from `start_step` on (rate 0
    before it: the rest of the model trains alone first)."""
    module: torch.nn.Module
    lr_scale: float = 1.0
    start_step: int = 0


def group_learning_rate(group, lr, step):
    """The learning rate of a parameter group at `step` when the schedule gives `lr`."""
    if step < group.get("start_step", 0):
        return 0.0
    return lr * group.get("lr_scale", 1.0)


def learning_rate_at(step, base_lr, warmup_steps, total_steps):
    """Linear warm-up from base_lr/warmup_steps to base_lr over `warmup_steps`, then cosine
    decay to 0 at `total_steps`: lr = base_lr * 0.5 * (1 + cos(pi * t)), t in [0, 1]."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


class WarmupCosine:
    """The schedule of a run: `schedule(step)` is learning_rate_at(step, ...) of its peak rate,
    warm-up and total steps (nothing to checkpoint: the step is the state)."""

    def __init__(self, base_lr, warmup_steps, total_steps):
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps

    def __call__(self, step):
        return learning_rate_at(step, self.base_lr, self.warmup_steps, self.total_steps)

