"""Transfer from a pretrained encoder without distorting it (Kumar et al. 2022, LP-FT; SimCLRv2):
the head starts from the linear probe's solution, the encoder trains at a fraction of the
head's learning rate, its BatchNorm statistics stay those learned on the unlabelled data, and
fine-tuning may start inside the projection head. Used by finetune.py (and the same ideas by
segment.py)."""
import torch
from torch import nn

from utils.errors import UserError
from utils.linear_probe import LinearProbe, extract_features
from utils.model import (build_encoder, build_model_from_meta, encoder_state, load_state_strict,
                         truncate_head)

BATCHNORM = nn.modules.batchnorm._BatchNorm


def freeze_batchnorm_statistics(module):
    """Put every BatchNorm layer of `module` in eval mode: it normalises with its running
    statistics (those of pretraining) and does not update them; its affine weight and bias
    still train. Call after model.train()."""
    for layer in module.modules():
        if isinstance(layer, BATCHNORM):
            layer.eval()


def linear_from_probe(probe):
    """nn.Linear(F, K) computing the fitted LinearProbe's logits on raw features:
    W x + b with W = W_p / sigma (per column), b = b_p - W mu, where the probe computes
    W_p (x - mu) / sigma + b_p."""
    weight = probe.weight / probe.sigma  # (K, F)
    bias = probe.bias - weight @ probe.mu
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        layer.bias.copy_(bias.float())
    return layer


def fit_probe_head(encoder, loader, device, n_classes, weight_decay=1e-4, max_iter=500):
    """(nn.Linear head, training accuracy): linear_evaluation.py's probe (L-BFGS logistic
    regression, L2 `weight_decay` on standardised features) fitted on the frozen features of
    `loader`'s images (no augmentation), as a head on the raw features: logits of
    head(encoder(x)) equal the probe's. `encoder` is put in eval mode."""
    features, labels = extract_features(encoder.to(device), loader, device, desc="probe features")
    probe = LinearProbe(n_classes, weight_decay, max_iter).fit(features, labels)
    accuracy = (probe.predict(features) == labels).double().mean().item()
    return linear_from_probe(probe), accuracy


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
