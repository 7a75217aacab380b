"""Semantic segmentation on a SimCLR encoder: image/labelmap pairs from path lists, their
validation before training, the joint augmentation of image and mask, the network (the
encoder's ResNet stages under an FCN or a light U-Net decoder), and the metrics.

A pair list has one `image_path,labelmap_path` per line, relative to the list's folder or
absolute; blank lines and lines starting with # are skipped. A labelmap is a single-channel
image (PNG mode L, P, I;16 or 1) of the image's size whose pixels hold class indices
0 .. K-1, or the ignore value (255 by default), which neither the loss nor the metrics count.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from utils.errors import UserError
from utils.data import derive_seed, load_image
from utils.model import FEATURE_DIMS, build_encoder
from utils.sources import listed_file, read_list_lines

IGNORE_INDEX = 255
SEGMENT_AUGMENT_STREAM = 21  # utils.data.derive_seed stream of the joint augmentation
LABELMAP_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")
DECODERS = ("fcn", "unet")
UNET_WIDTH = 64


@dataclass
class PairList:
    """Image paths and their labelmap paths, in list order."""
    images: list
    masks: list

    def __len__(self):
        return len(self.images)


def read_pair_list(list_path):
    """PairList from a text file of `image_path,labelmap_path` lines (see module docstring);
    UserError naming the line for a missing file or a line without two paths."""
    images, masks = [], []
    for number, line in read_list_lines(list_path, "'image_path,labelmap_path'",
                                        "give a text file of such lines"):
        image, _, mask = (part.strip() for part in line.partition(","))
        if not image or not mask or "," in mask:
            raise UserError(f"{list_path} line {number}: '{line}' is not "
                            f"'image_path,labelmap_path'; give exactly two paths per line")
        images.append(listed_file(list_path, number, image))
        masks.append(listed_file(list_path, number, mask, what="labelmap"))
    if not images:
        raise UserError(f"path list {list_path} names no image/labelmap pairs")
    return PairList(images, masks)


def read_labelmap(path):
    """The labelmap at `path` as an int64 array (H, W) of class indices (palette images give
    their palette indices). UserError naming the file for an unreadable or multi-channel one."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABELMAP_MODES:
                raise UserError(
                    f"labelmap {path} has {len(img.getbands())} channels (mode {img.mode}); "
                    f"save it as a single-channel PNG of class indices (mode L or P)")
            return np.asarray(img).astype(np.int64)
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise UserError(f"labelmap {path} could not be read ({type(err).__name__}); replace "
                        f"the file") from None


def image_size_of(path):
    """(width, height) of the image at `path`, decoded completely so a truncated file is found
    now rather than during training; UserError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.size
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise UserError(f"image {path} could not be read ({type(err).__name__}); replace the "
                        f"file or remove its line") from None


def scan_pairs(pairs, ignore_index):
    """Decode every image and labelmap of `pairs` once and check each pair: UserError naming
    the file for an unreadable file, a multi-channel labelmap, or a labelmap whose size differs
    from its image's. Returns (maxima, counts): the largest class index of each labelmap
    (-1 when all its pixels are `ignore_index`) and the pixel count of every class index."""
    maxima, counts = [], np.zeros(0, np.int64)
    for image_path, mask_path in zip(pairs.images, pairs.masks):
        width, height = image_size_of(image_path)
        mask = read_labelmap(mask_path)
        if mask.shape != (height, width):
            raise UserError(f"labelmap {mask_path} is {mask.shape[1]}x{mask.shape[0]} px but its "
                            f"image {image_path} is {width}x{height}; a labelmap must have the "
                            f"size of its image")
        valid = mask[mask != ignore_index]
        if valid.size and valid.min() < 0:
            raise UserError(f"labelmap {mask_path} holds the negative value {valid.min()}; class "
                            f"indices are 0 .. K-1 (and the ignore value)")
        maxima.append(int(valid.max()) if valid.size else -1)
        found = np.bincount(valid)
        if len(found) > len(counts):
            counts = np.pad(counts, (0, len(found) - len(counts)))
        counts[:len(found)] += found
    return maxima, counts


def check_class_indices(pairs, maxima, num_classes, ignore_index, source):
    """UserError naming the first labelmap holding a class index >= num_classes that is not the
    ignore value; `source` says where num_classes came from (for the message)."""
    for mask_path, largest in zip(pairs.masks, maxima):
        if largest >= num_classes:
            raise UserError(f"labelmap {mask_path} holds class index {largest}, but there are "
                            f"{num_classes} classes ({source}) and the ignore value is "
                            f"{ignore_index}; fix the labelmap or pass --num-classes "
                            f"{largest + 1}")


class LabelMap(tv_tensors.Mask):
    """A tv_tensors.Mask that crops and resizes by nearest neighbour at pixel centres
    ('nearest-exact', the convention of bilinear image resampling). torchvision's Mask kernels
    use torch's legacy 'nearest' (source index floor(i * scale)), which shifts a resampled mask
    by up to half an output pixel against its image."""


@v2.functional.register_kernel(v2.functional.resized_crop, LabelMap)
def _resized_crop_labelmap(mask, top, left, height, width, size, **kwargs):
    cropped = v2.functional.crop_mask(mask.as_subclass(torch.Tensor), top, left, height, width)
    return tv_tensors.wrap(v2.functional.resize_mask(
        cropped, size, interpolation=v2.InterpolationMode.NEAREST_EXACT), like=mask)


@v2.functional.register_kernel(v2.functional.resize, LabelMap)
def _resize_labelmap(mask, size, max_size=None, **kwargs):
    return tv_tensors.wrap(v2.functional.resize_mask(
        mask.as_subclass(torch.Tensor), size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
        max_size=max_size), like=mask)


class JointTransform:
    """(PIL image, labelmap (H, W) int64 tensor) -> (image (C, S, S) float32 normalised,
    mask (S, S) int64), with torchvision.transforms.v2 applying one draw of the random
    parameters to both (the mask as a LabelMap, a tv_tensors.Mask resampled by nearest
    neighbour at pixel centres, so it holds only values of the original labelmap and stays
    aligned with the bilinearly resampled image).

    train: RandomResizedCrop(S, scale=(min_scale, 1), ratio 3/4-4/3) -> RandomHorizontalFlip
    eval:  Resize((S, S)) of the whole image (the aspect ratio is not kept), no randomness
    then (image only) uint8 -> [0, 1] float (a float 'F' image, a 16-bit or float file
    already scaled to [0, 1], keeps its values) -> Normalize(mean, std).
    """

    def __init__(self, image_size, mean, std, train, min_scale=0.5):
        if train:
            geometric = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                                              antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometric = [v2.Resize((image_size, image_size), antialias=True)]
        self.transform = v2.Compose(
            [v2.ToImage(), *geometric,
             v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
             v2.Normalize(mean, std)])

    def __call__(self, img, mask):
        image, mask = self.transform(img, LabelMap(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class SegmentationDataset(torch.utils.data.Dataset):
    """Pairs as (image (C, S, S), mask (S, S) int64) through a JointTransform.

    With `seed` None the keys are indices (evaluation); otherwise keys are (index, epoch) from
    utils.data.EpochBatchSampler and the augmentation of that pair is seeded with
    derive_seed(SEGMENT_AUGMENT_STREAM, seed, epoch, index) in a forked RNG, so a run resumed
    mid-epoch sees the same crops. `intensity_range` (low, high): how 16-bit and float images
    are scaled to [0, 1] (utils.data.load_image; the model's model_meta["intensity_range"]).
    """

    def __init__(self, pairs, channels, transform, seed=None, intensity_range=None):
        self.pairs, self.channels, self.transform, self.seed = pairs, channels, transform, seed
        self.intensity_range = intensity_range

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        index, epoch = key if self.seed is not None else (key, None)
        img = load_image(self.pairs.images[index], self.channels, self.intensity_range)
        mask = torch.from_numpy(read_labelmap(self.pairs.masks[index]))
        if self.seed is None:
            return self.transform(img, mask)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(SEGMENT_AUGMENT_STREAM, self.seed, epoch, index))
            return self.transform(img, mask)


def stage_channels(arch):
    """Channels of the four ResNet stages layer1..layer4: F/8, F/4, F/2, F for feature size F
    (64, 128, 256, 512 for ResNet-18/34; 256, 512, 1024, 2048 for ResNet-50)."""
    feat = FEATURE_DIMS[arch]
    return [feat // 8, feat // 4, feat // 2, feat]


def conv_bn_relu(in_channels, out_channels):
    """3x3 convolution (padding 1, no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FCNDecoder(nn.Module):
    """Class logits from the last stage: a 1x1 convolution, [f1..f4] -> (B, K, h4, w4)."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, features):
        return self.classifier(features[-1])


class UNetDecoder(nn.Module):
    """A light U-Net decoder over the stages: starting from f4, for each of f3, f2, f1 in turn
    x = conv_bn_relu(concat(bilinear_upsample(x to f_i's size), f_i)) with UNET_WIDTH
    channels, then a 1x1 convolution to K logits at f1's resolution, [f1..f4] -> (B, K, h1, w1)."""

    def __init__(self, channels, num_classes, width=UNET_WIDTH):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.blocks = nn.ModuleList([conv_bn_relu(c4 + c3, width), conv_bn_relu(width + c2, width),
                                     conv_bn_relu(width + c1, width)])
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features):
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)


class SegmentationNet(nn.Module):
    """encoder stages -> decoder -> bilinear upsampling to the input size:
    x (B, C, H, W) -> logits (B, K, H, W).

    `encoder` is the ResNet of utils.model.build_encoder (state-dict keys `encoder.*` as in a
    pretrained SimCLR model). With `frozen` its parameters get no gradient and its BatchNorm
    layers stay in eval mode (running statistics untouched) whatever train() is called with.
    """

    def __init__(self, encoder, decoder, frozen=False):
        super().__init__()
        self.encoder, self.decoder, self.frozen = encoder, decoder, frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def stages(self, x):
        """The outputs [f1, f2, f3, f4] of layer1..layer4 (strides: stage_strides(encoder), e.g.
        1, 2, 4, 8 with the cifar stem, 4, 8, 16, 32 with the imagenet stem, less where
        dilate_encoder traded them for dilation)."""
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        features = []
        for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward(self, x):
        logits = self.decoder(self.stages(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def stage_strides(encoder):
    """The strides of layer1..layer4's outputs with respect to the input, [s1, s2, s3, s4]
    (1, 2, 4, 8 with the cifar stem; 2, 4, 8, 16 with half; 4, 8, 16, 32 with imagenet)."""
    stride = encoder.conv1.stride[0] * (2 if isinstance(encoder.maxpool, nn.MaxPool2d) else 1)
    strides = []
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        stride *= layer_stride(layer)
        strides.append(stride)
    return strides


def layer_stride(layer):
    """The stride of a ResNet stage: its first block's (the stride of its downsample)."""
    downsample = layer[0].downsample
    return downsample[0].stride[0] if downsample is not None else 1


def dilate_encoder(encoder, output_stride):
    """Trade the strides of the last stages of a torchvision ResNet for dilation, in place,
    until layer4's output stride is at most `output_stride` (DeepLab's output stride; what
    torchvision's replace_stride_with_dilation does): in a dilated stage the stride-2
    convolutions get stride 1, the 3x3 convolutions up to the stride keep the dilation d of the
    stage before and those after it get d * 2 (padding = dilation): the "a trous" rule, so the
    dilated stage's output sampled every 2 pixels is exactly the strided one's. The weights
    keep their shapes, so pretrained ones load unchanged. Returns the stages' strides after."""
    strides, dilation = stage_strides(encoder), 1
    layers = (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
    for i, layer in enumerate(layers):
        step = layer_stride(layer)
        if step == 1 or strides[i] <= output_stride:
            continue
        after_stride = False  # a 3x3 convolution after the stage's stride sees the finer grid
        for conv in (m for m in layer.modules() if isinstance(m, nn.Conv2d)):
            d = dilation * step if after_stride else dilation
            if conv.stride[0] > 1:
                conv.stride, after_stride = (1, 1), True
            if conv.kernel_size[0] == 3:
                conv.dilation, conv.padding = (d, d), (d, d)
        dilation *= step
        strides[i:] = [s // step for s in strides[i:]]
    return strides


def build_segmentation_net(arch, in_channels, stem, num_classes, decoder, frozen=False,
                           output_stride=None):
    """SegmentationNet with a fresh encoder of these settings and a `decoder` ('fcn' or 'unet')
    head for `num_classes` classes; with `output_stride` its last stages dilated
    (dilate_encoder) so that layer4's stride is at most that."""
    encoder, _ = build_encoder(arch, in_channels, stem)
    if output_stride is not None:
        dilate_encoder(encoder, output_stride)
    heads = {"fcn": FCNDecoder, "unet": UNetDecoder}
    return SegmentationNet(encoder, heads[decoder](stage_channels(arch), num_classes), frozen)


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """(K, K) int64 counts over the pixels whose target is not `ignore_index`: entry [t, p] is
    the number of pixels of true class t predicted as p. pred, target: int tensors of one shape."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(matrix):
    """Scores of a confusion matrix (K, K) accumulated over all pixels of a split:
    IoU_c = TP_c / (TP_c + FP_c + FN_c), NaN for a class absent from both ground truth and
    prediction (0/0); mIoU = mean of the IoU_c that are not NaN;
    pixel accuracy = correct pixels / valid pixels. Returns a dict of floats and the IoU list."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    total = matrix.sum()
    return {"iou": iou.tolist(), "miou": float(iou[present].mean()) if present.any() else
            float("nan"), "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "pixels": int(total)}


def overlay(image, labels, colours, ignore_index=IGNORE_INDEX, alpha=0.5):
    """RGB (H, W, 3) in [0, 1]: `image` (H, W) gray or (H, W, 3) in [0, 1] blended with
    colours[c] (RGB) at weight `alpha` on the pixels of class c; ignore pixels left as they are."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
    valid = labels != ignore_index
    palette = np.asarray(colours, dtype=np.float64)[:, :3]
    rgb[valid] = (1 - alpha) * rgb[valid] + alpha * palette[labels[valid]]
    return rgb


def plot_segmentation_grid(images, truths, predictions, class_names, path, titles=(),
                           ignore_index=IGNORE_INDEX):
    """PNG grid, one row per image: the image, the ground truth overlaid, the prediction
    overlaid (`titles[i]` above it), and one legend of class colours.

    images (N, H, W) or (N, H, W, 3) in [0, 1]; truths and predictions (N, H, W) int.
    """
    from matplotlib.patches import Patch

    from utils.plotfuncs import class_colours, pyplot, save_figure, show_image

    colours = class_colours(len(class_names))
    plt = pyplot()
    fig, axes = plt.subplots(len(images), 3, figsize=(6, 2 * len(images) + 0.6), squeeze=False)
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        panels = (image, overlay(image, truth, colours, ignore_index),
                  overlay(image, pred, colours, ignore_index))
        heads = ("image", "ground truth", "prediction" + (f"\n{titles[row]}" if titles else ""))
        for ax, panel, head in zip(axes[row], panels, heads):
            show_image(ax, panel)
            ax.set_title(head, fontsize=8)
    handles = [Patch(color=c) for c in colours] + [Patch(facecolor="none", edgecolor="gray")]
    names = list(class_names) + [f"{ignore_index} ignore (not coloured)"]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize="small")
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(names) - 1) // 4), 1, 1))
    save_figure(fig, path)
