"""SimCLR network: a torchvision ResNet encoder f (fc removed) and an MLP projection head g.

    h = f(x)  (B, feat_dim)      the representation used downstream
    z = g(h)  (B, proj_dims[-1]) the projection the contrastive loss sees
"""
import torch
import torchvision
from torch import nn

from utils.checkpoint import load_pretrained
from utils.errors import UserError

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
SMALL_IMAGE_MAX = 64
# The first layers of the encoder: (kernel, stride, padding) of conv1 and whether the max-pool
# follows. 'cifar' keeps small images at full resolution into layer1; 'half' halves it (a
# quarter of the compute of every later layer); 'imagenet' is torchvision's own (stride 4).
STEMS = {"cifar": (3, 1, 1, False), "half": (3, 2, 1, False), "imagenet": (7, 2, 3, True)}
STEM_CHOICES = ("auto", *STEMS)
STEM_HELP = ("first layers: cifar = 3x3 conv stride 1, no max-pool (full resolution); half = "
             "3x3 conv stride 2, no max-pool (half resolution, about 4x less compute); imagenet "
             "= 7x7 stride 2 + max-pool; auto = cifar for images <= 64 px, else imagenet")


def resolve_stem(stem, image_size):
    """'auto' -> 'cifar' (3x3 conv stride 1, no max-pool) for images <= 64 px, else 'imagenet'."""
    if stem == "auto":
        return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"
    return stem


def default_proj_dims(arch):
    """Hidden and output widths of the head: [feat_dim, 128] (512->512->128 for ResNet-18)."""
    return [FEATURE_DIMS[arch], 128]


def build_encoder(arch, in_channels, stem):
    """torchvision ResNet (weights=None) with fc removed and the first conv for `in_channels`.

    `stem` is a key of STEMS: 'cifar' replaces the 7x7 stride-2 conv and the max-pool by a 3x3
    stride-1 conv, which keeps small images at full resolution into layer1; 'half' by a 3x3
    stride-2 conv. Returns (module, feat_dim).
    """
    if arch not in FEATURE_DIMS:
        raise UserError(f"unknown --arch {arch}; choose one of {', '.join(FEATURE_DIMS)}")
    if stem not in STEMS:
        raise UserError(f"unknown --stem {stem}; choose one of {', '.join(STEM_CHOICES)}")
    net = getattr(torchvision.models, arch)(weights=None)
    kernel, stride, padding, maxpool = STEMS[stem]
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=kernel, stride=stride, padding=padding,
                          bias=False)
    if not maxpool:
        net.maxpool = nn.Identity()
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net, FEATURE_DIMS[arch]


def build_torchvision_backbone(meta):
    """The plain torchvision ResNet that export.py's state dict loads into with strict=True.

    torchvision.models.<arch>(weights=None) with conv1 rebuilt for meta's in_channels and stem
    (STEMS: 3x3 stride 1 or 2 and maxpool = Identity for 'cifar' and 'half', 7x7 stride 2 for
    'imagenet') and
    fc = Identity: forward(x (B, in_channels, S, S)) -> h (B, feature_dim). `meta` is the
    "meta" dict of the exported file (any dict with arch, in_channels and stem will do).
    """
    return build_encoder(meta["arch"], meta["in_channels"], meta["stem"])[0]


def build_projection_head(in_dim, proj_dims, norm=True):
    """nn.Sequential MLP: for each hidden width Linear -> BatchNorm1d -> ReLU, then a final
    Linear to proj_dims[-1]. proj_dims [512, 128] gives 512->512->128 from a 512-d h.
    norm=False: Linear (with bias) -> ReLU for the hidden layers, the head of other projects'
    weights (utils/foreign_weights.py); proj_dims [] is no head (z = h)."""
    layers, dim = [], in_dim
    for width in proj_dims[:-1]:
        if norm:
            layers += [nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width)]
        else:
            layers.append(nn.Linear(dim, width))
        layers.append(nn.ReLU(inplace=True))
        dim = width
    if proj_dims:
        layers.append(nn.Linear(dim, proj_dims[-1]))
    return nn.Sequential(*layers)


def head_depth(head):
    """Number of Linear layers in a projection head."""
    return sum(isinstance(m, nn.Linear) for m in head)


def truncate_head(head, remove_top_layers):
    """The head without its top `remove_top_layers` Linear layers (each with what follows it).

    0 keeps the whole head (output z); head_depth(head) removes all of it (output h); 1 on a
    two-layer head gives the hidden activation ReLU(BN(W1 h)).
    """
    depth = head_depth(head)
    if not 0 <= remove_top_layers <= depth:
        raise UserError(f"--remove_top_layers must be between 0 and {depth} (the head has {depth} "
                        f"Linear layers); {depth} gives the encoder output h")
    if remove_top_layers == 0:
        return head
    linear_positions = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    cut = linear_positions[depth - remove_top_layers]
    return nn.Sequential(*list(head)[:cut])


class SimCLRModel(nn.Module):
    """Encoder plus projection head; forward(x: (B, C, S, S)) -> (h: (B, F), z: (B, P))."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def build_model(arch, in_channels, stem, proj_dims, head_norm=True):
    """The SimCLR model for these settings (stem already resolved, proj_dims a list)."""
    encoder, feat_dim = build_encoder(arch, in_channels, stem)
    return SimCLRModel(encoder, build_projection_head(feat_dim, proj_dims, head_norm))


def build_model_from_meta(meta):
    """build_model with the settings a checkpoint's model_meta (or run.json) records."""
    return build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"],
                       meta.get("head_norm", True))


def load_state_strict(model, state_dict, source):
    """load_state_dict(strict=True), turning a mismatch into a UserError naming `source`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"{source} does not match the architecture it claims ({first[:160]}); "
                        f"it belongs to another model or run") from None


def encoder_state(state_dict):
    """The `encoder.*` entries of a SimCLR model's state dict, without the prefix: the weights
    of build_encoder's module, for fine-tuning and segmentation."""
    return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}


def adapt_input_channels(state_dict, channels, key="encoder.conv1.weight"):
    """A copy of `state_dict` whose first convolution takes `channels` inputs (1 or 3).

    3 -> 1: the filters summed over RGB, so a gray image gives the response the RGB model gave
    to that image replicated in three channels. 1 -> 3: the filter repeated and divided by 3,
    so an RGB image with equal channels gives the response the gray model gave. Returns the
    state dict unchanged when the count already matches.
    """
    weight = state_dict[key]  # (out, in, k, k)
    if weight.shape[1] == channels:
        return state_dict
    if (weight.shape[1], channels) == (3, 1):
        adapted = weight.sum(dim=1, keepdim=True)
    elif (weight.shape[1], channels) == (1, 3):
        adapted = weight.repeat(1, 3, 1, 1) / 3
    else:
        raise ValueError(f"cannot adapt {weight.shape[1]} input channels to {channels}")
    return {**state_dict, key: adapted}


def load_trained_model(modelpath, random_weights=False, seed=0, settings=None):
    """The SimCLR model of a main.py model.pth / checkpoint.pth, strictly loaded, in eval mode,
    and its metadata (arch, stem, proj_dims, in_channels, image_size, mean, std).
    random_weights: the same architecture initialised from `seed` instead (a reference).
    settings: image size and mean/std for weights in torchvision's layout (WeightSettings)."""
    state_dict, meta = load_pretrained(modelpath, settings)
    torch.manual_seed(seed)
    model = build_model_from_meta(meta)
    if not random_weights:
        load_state_strict(model, state_dict, modelpath)
    return model.eval(), meta
