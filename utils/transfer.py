"""Transfer from a pretrained encoder without distorting it (Kumar et al. 2022, LP-FT; SimCLRv2):
the head starts from the linear probe's solution, the encoder trains at a fraction of the
head's learning rate, its BatchNorm statistics stay those learned on the unlabelled data, and
fine-tuning may start inside the projection head. Used by finetune.py (and the same ideas by
segment.py)."""
import torch
from torch import nn

from utils.errors import UserError
from utils.linear_probe import extract_features, fit_probe
from utils.model import (build_encoder, build_model_from_meta, encoder_state, load_state_strict,
                         truncate_head)

BATCHNORM = nn.modules.batchnorm._BatchNorm
# The pretrained encoder's learning rate relative to the head's (docs/defaults.md).
DEFAULT_ENCODER_LR_RATIO = 0.1
MIN_STATISTICS_UPDATES = 50  # BatchNorm running averages (momentum 0.1) kept by --encoder-bn auto


def add_transfer_args(group, head="head", ratio=DEFAULT_ENCODER_LR_RATIO, bn="auto"):
    """--encoder-lr-ratio and --encoder-bn, the same in finetune.py and segment.py (`head`:
    what trains beside the encoder, for the help text; `ratio` and `bn`: the script's defaults
    for a pretrained encoder, chosen by measurement, docs/defaults.md)."""
    group.add_argument("--encoder-lr-ratio", type=float, default=None,
                       help=f"the encoder's learning rate as a fraction of the {head}'s "
                            f"(default {ratio:g} for a pretrained encoder, 1 with --baseline)")
    group.add_argument("--encoder-bn", choices=("auto", "frozen", "train"), default=bn,
                       help="the encoder's BatchNorm statistics: frozen = kept from pretraining "
                            "(normalise with them, never update them; a few dozen labelled "
                            "images per batch would replace them by noisy ones), train = "
                            "batch statistics, updated; auto = frozen for a pretrained encoder, "
                            "unless pretraining updated them fewer than "
                            f"{MIN_STATISTICS_UPDATES} times (they have not converged); train "
                            "with --baseline (there is nothing to keep)")


def resolve_encoder_lr_ratio(args, default=DEFAULT_ENCODER_LR_RATIO):
    """args.encoder_lr_ratio: `default` for a pretrained encoder, 1 for --baseline, or the
    value given (checked)."""
    if args.encoder_lr_ratio is None:
        args.encoder_lr_ratio = 1.0 if args.baseline else default
    if not args.encoder_lr_ratio > 0:
        raise UserError(f"--encoder-lr-ratio {args.encoder_lr_ratio} must be positive, e.g. "
                        f"0.1 (--freeze keeps the encoder fixed)")


def batchnorm_mode(choice, pretrained_state):
    """('frozen' or 'train', why) for --encoder-bn `choice`: auto keeps the statistics of a
    pretrained encoder unless pretraining updated them fewer than MIN_STATISTICS_UPDATES times
    (running averages still near their initial values would not normalise: activations and
    gradients blow up); a file that does not count its updates (0) is trusted."""
    if choice != "auto":
        return choice, "--encoder-bn"
    if pretrained_state is None:
        return "train", "no pretrained statistics"
    counts = [int(v) for k, v in pretrained_state.items() if k.endswith("num_batches_tracked")]
    updates = min(counts) if counts else 0
    if 0 < updates < MIN_STATISTICS_UPDATES:
        return "train", f"pretraining updated them only {updates} times"
    return "frozen", "those of pretraining"


def freeze_batchnorm_statistics(module):
    """Put every BatchNorm layer of `module` in eval mode: it normalises with its running
    statistics (those of pretraining) and does not update them; its affine weight and bias
    still train. Call after model.train()."""
    for layer in module.modules():
        if isinstance(layer, BATCHNORM):
            layer.eval()


class ProbeHead(nn.Module):
    """The linear probe as a trainable head: logits = W (h - mu) / sigma + b, with the probe's
    feature mean mu and std sigma (F,) kept fixed (buffers) and W (K, F), b (K,) trained.
    Training W in the probe's standardised coordinates keeps fine-tuning well conditioned: on
    the raw, uncentred h (its mean dominates |h|^2) a gradient step mostly shifts every logit
    of a class alike, which moves the decision far more than the step size suggests."""

    def __init__(self, feat_dim, n_classes):
        super().__init__()
        self.linear = nn.Linear(feat_dim, n_classes)
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("std", torch.ones(feat_dim))

    @property
    def out_features(self):
        return self.linear.out_features

    def forward(self, h):
        return self.linear((h - self.mean) / self.std)

    @classmethod
    def from_probe(cls, probe):
        """The head whose logits equal the fitted LinearProbe's decision function."""
        head = cls(probe.weight.shape[1], probe.weight.shape[0])
        with torch.no_grad():
            head.linear.weight.copy_(probe.weight.float())
            head.linear.bias.copy_(probe.bias.float())
            head.mean.copy_(probe.mu.float())
            head.std.copy_(probe.sigma.float())
        return head


def fit_probe_head(encoder, loader, device, n_classes, weight_decay=None, seed=0):
    """(ProbeHead, training accuracy): linear_evaluation.py's probe (L-BFGS logistic
    regression, L2 `weight_decay` on standardised features; None: chosen on held-out training
    features, as linear_evaluation.py does by default) fitted on the frozen features of
    `loader`'s images (no augmentation), as a head: head(encoder(x)) gives the probe's logits.
    `encoder` is put in eval mode."""
    features, labels = extract_features(encoder.to(device), loader, device, desc="probe features")
    probe = fit_probe(features, labels, n_classes, weight_decay, seed=seed)
    accuracy = (probe.predict(features) == labels).double().mean().item()
    return ProbeHead.from_probe(probe), accuracy


def encoder_with_head_layers(meta, state, layers):
    """The encoder f followed by the first `layers` Linear layers of the projection head (each
    with its BatchNorm and ReLU): SimCLRv2's "fine-tuning from a middle layer of the projection
    head"; 0 gives f alone. Loaded from `state` (a SimCLR model's state dict) unless it is None
    (random initialisation: seed torch first). Returns (module, output size F)."""
    if layers == 0:
        encoder, feat_dim = build_encoder(meta["arch"], meta["in_channels"], meta["stem"])
        if state is not None:
            load_state_strict(encoder, encoder_state(state), "MODELPATH")
        return encoder, feat_dim
    depth = len(meta.get("proj_dims") or ())
    if not 0 < layers < depth:
        raise UserError(f"--from-head-layer {layers}: the projection head has {depth} Linear "
                        f"layer(s), so 0 (from h) to {max(depth - 1, 0)} can be kept")
    model = build_model_from_meta(meta)
    if state is not None:
        load_state_strict(model, state, "MODELPATH")
    kept = truncate_head(model.head, depth - layers)
    return nn.Sequential(model.encoder, *kept), meta["proj_dims"][layers - 1]
