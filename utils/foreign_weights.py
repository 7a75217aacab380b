"""Weights of other projects as a model of this toolkit: any state dict in torchvision's ResNet
layout (conv1, bn1, layer1..layer4, optionally fc), such as

- thunderInfy/simclr's model.pth: torchvision resnet18 whose `fc` is a Sequential head
  fc1 (512->100), ReLU, fc2 (100->100), ReLU, fc3 (100->100); `module.` keys under DataParallel;
- a torchvision ImageNet weights file (resnet50-*.pth): `fc` is the 1000-class classifier,
  which is dropped (the model's h is then the backbone output and z = h);
- a bare backbone with `fc` removed or Identity (what other SimCLR code exports).

The architecture comes from the block counts (and Bottleneck's conv3), the stem from conv1's
kernel (7x7: imagenet, 3x3: cifar), the channels from conv1, the head from the Linear layers
under `fc.` (ReLU between them, no BatchNorm: `head_norm` False). What the weights do not say,
the image size and normalisation, comes from `WeightSettings` (flags), with printed defaults.
"""
from dataclasses import dataclass

import torch

from utils.errors import UserError

BLOCKS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
          ((3, 4, 6, 3), True): "resnet50"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# ImageNet's statistics of the luma (0.299 R + 0.587 G + 0.114 B) for 1-channel weights.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = [0.449], [0.226]


@dataclass
class WeightSettings:
    """What a foreign weights file does not store: input side in pixels and per-channel
    mean/std (None: the defaults, printed). from_flags: the values come from --image-size,
    --mean, --std (named in the printed line), not from the script itself."""
    image_size: int = None
    mean: list = None
    std: list = None
    from_flags: bool = True

    @classmethod
    def from_args(cls, args):
        return cls(getattr(args, "image_size", None), getattr(args, "mean", None),
                   getattr(args, "std", None))


def is_torchvision_resnet(state_dict):
    """Whether the (prefix-free) state dict has torchvision's ResNet keys."""
    return "conv1.weight" in state_dict and any(k.startswith("layer4.") for k in state_dict)


def infer_architecture(state_dict, path):
    """(arch, stem, in_channels) of a torchvision-layout ResNet state dict."""
    blocks = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    bottleneck = any(k.endswith(".conv3.weight") for k in state_dict)
    arch = BLOCKS.get((blocks, bottleneck))
    if arch is None:
        raise UserError(f"{path} is a ResNet with {list(blocks)} blocks per stage"
                        f"{' (bottleneck)' if bottleneck else ''}; this toolkit builds resnet18 "
                        f"[2, 2, 2, 2], resnet34 [3, 4, 6, 3] and resnet50 [3, 4, 6, 3] "
                        f"bottleneck")
    conv1 = state_dict["conv1.weight"]
    kernel = tuple(conv1.shape[2:])
    stems = {(7, 7): "imagenet", (3, 3): "cifar"}
    if conv1.dim() != 4 or kernel not in stems:
        raise UserError(f"{path}: conv1 has shape {list(conv1.shape)}; expected a 7x7 "
                        f"(imagenet) or 3x3 (cifar) first convolution")
    return arch, stems[kernel], int(conv1.shape[1])


def head_layers(state_dict, feat_dim, path):
    """The Linear layers under `fc.` in order, [(weight (out, in), bias (out,) or None)], []
    for a bare backbone or a single classifier layer (dropped, said in the note). Returns
    (layers, note)."""
    fc = {k[3:]: v for k, v in state_dict.items() if k.startswith("fc.")}
    if not fc:
        return [], "no head (a bare backbone): z = h"
    if set(fc) <= {"weight", "bias"}:
        return [], (f"its fc ({fc['weight'].shape[1]} -> {fc['weight'].shape[0]}, a classifier) "
                    f"is dropped: z = h")
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in fc))
    layers = []
    for name in names:
        weight, bias = fc.get(f"{name}.weight"), fc.get(f"{name}.bias")
        extra = set(k for k in fc if k.startswith(f"{name}.")) - {f"{name}.weight",
                                                                   f"{name}.bias"}
        if weight is None or weight.dim() != 2 or extra:
            raise UserError(f"{path}: fc.{name} is not a Linear layer (keys "
                            f"{sorted(k for k in fc if k.startswith(name + '.'))}); heads of "
                            f"Linear layers and ReLUs are supported")
        layers.append((weight, bias))
    dims_in = [w.shape[1] for w, _ in layers]
    dims_out = [feat_dim] + [w.shape[0] for w, _ in layers[:-1]]
    if dims_in != dims_out:
        raise UserError(f"{path}: the fc layers do not chain ({dims_out} features into layers "
                        f"taking {dims_in})")
    widths = " -> ".join(str(d) for d in [feat_dim] + [w.shape[0] for w, _ in layers])
    return layers, f"head of {len(layers)} Linear layer(s) {widths} with ReLU between"


def convert_torchvision_resnet(state_dict, path, settings):
    """(state dict of build_model(arch, C, stem, proj_dims, head_norm=False), meta) from a
    torchvision-layout ResNet state dict; prints what was found and what was assumed."""
    arch, stem, channels = infer_architecture(state_dict, path)
    feat_dim = next(v.shape[0] for k, v in reversed(state_dict.items())
                    if k.startswith("layer4.") and k.endswith(".weight") and v.dim() == 1)
    layers, note = head_layers(state_dict, feat_dim, path)
    state = {f"encoder.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
    for i, (weight, bias) in enumerate(layers):  # head Sequential: Linear, ReLU, Linear, ...
        state[f"head.{2 * i}.weight"] = weight
        state[f"head.{2 * i}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    size = settings.image_size or (224 if stem == "imagenet" else 32)
    mean = settings.mean or (IMAGENET_MEAN if channels == 3 else IMAGENET_GRAY_MEAN)
    std = settings.std or (IMAGENET_STD if channels == 3 else IMAGENET_GRAY_STD)
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"--mean/--std give {len(mean)}/{len(std)} value(s); {path} takes "
                        f"{channels} channel(s)")
    assumed = [] if settings.image_size else ["--image-size"]
    assumed += [] if settings.mean else ["--mean"]
    assumed += [] if settings.std else ["--std"]
    defaults = (f" (defaults; set {', '.join(assumed)} to change)"
                if assumed and settings.from_flags else "")
    print(f"{path}: torchvision-layout {arch} ({stem} stem, {channels} channel(s)), {note}; "
          f"images {size} px, mean {mean}, std {std}{defaults}", flush=True)
    meta = {"arch": arch, "stem": stem, "proj_dims": [int(w.shape[0]) for w, _ in layers],
            "in_channels": channels, "image_size": size, "mean": list(mean), "std": list(std),
            "head_norm": False}
    return state, meta
