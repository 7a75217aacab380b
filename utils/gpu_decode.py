"""--gpu-decode: JPEG files decoded on the training device, a batch at a time.

For data too large for --gpu-aug (which decodes every image once into memory): DataLoader
workers only read file bytes (EncodedImageDataset), the main process decodes the batch's JPEGs
on the device with torchvision.io.decode_jpeg (nvJPEG on CUDA) and resizes each to S x S
(BatchDecoder), and utils.gpu_augment.DeviceTwoViews augments the batch there, as --gpu-aug
does. The pixels match decode_images (the data of --gpu-aug): the whole image is converted
like PIL's convert("L"/"RGB") and stretched to S x S, bilinear and antialiased.

Files that are not JPEG (PNG, TIFF ...) and array sources (MedMNIST) are decoded by the
workers with PIL, as decode_images would, and travel as uint8 pixels (16-bit and float images
scaled by the ImageList's intensity range, then rounded to 8 bits); a JPEG the device cannot
decode is decoded on the host with PIL, or replaced as in training (warning naming it).
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.data import load_with_substitute, uint8_pixels

JPEG_MAGIC = b"\xff\xd8\xff"
# PIL's convert("L"): L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (ITU-R 601-2 in 16-bit
# fixed point); the weights sum to 2^16, so a gray image expanded to RGB comes back unchanged.
LUMA_WEIGHTS = (19595, 38470, 7471)


def read_jpeg_bytes(path):
    """The bytes of file `path` as a uint8 tensor (n,) if it is a JPEG (by its magic number),
    else None (also when it cannot be read: the caller decodes it another way)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data[:3].tobytes() != JPEG_MAGIC:
        return None
    return torch.from_numpy(data)


def pil_pixels(images, index, channels, size, key=(0, 0), unreadable=None):
    """Image `index` decoded on the host as decode_images does: uint8 (channels, size, size);
    an unreadable file is replaced as in load_with_substitute (key (seed, epoch))."""
    img, _ = load_with_substitute(images, index, channels, key, unreadable)
    return uint8_pixels(img, channels, size)


class EncodedImageDataset(torch.utils.data.Dataset):
    """Key (index, epoch) of EpochBatchSampler -> (index, jpeg, pixels): the file's bytes as a
    uint8 tensor (n,) with pixels None for a JPEG file, else jpeg None and the image decoded
    here (pil_pixels, uint8 (C, S, S)). Batches are lists of these (collate_encoded)."""

    def __init__(self, images, channels, size, seed=0, unreadable=None):
        self.images, self.channels, self.size = images, channels, size
        self.seed, self.unreadable = seed, unreadable

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, epoch = key
        if self.images.pixels is None:
            data = read_jpeg_bytes(self.images.paths[index])
            if data is not None:
                return index, data, None
        return index, None, pil_pixels(self.images, index, self.channels, self.size,
                                       (self.seed, epoch), self.unreadable)


def collate_encoded(items, labels=None):
    """A batch of EncodedImageDataset items as they are: a list (the bytes differ in length);
    with `labels` (N,) int64 (the online probe's, bound with functools.partial) the pair
    (list, labels of the items' images (b,))."""
    if labels is None:
        return list(items)
    return list(items), labels[torch.tensor([index for index, _, _ in items])]


def to_channels(rgb, channels):
    """uint8 RGB images (..., 3, H, W) as `channels` channels: themselves for 3, PIL's
    convert("L") luma (LUMA_WEIGHTS) for 1."""
    if channels == 3:
        return rgb
    r, g, b = rgb.unbind(-3)
    w_r, w_g, w_b = LUMA_WEIGHTS
    luma = (r.int() * w_r + g.int() * w_g + b.int() * w_b + (1 << 15)) >> 16
    return luma.to(torch.uint8).unsqueeze(-3)


def resize_uint8(x, size):
    """uint8 images (n, C, H, W) stretched to (n, C, size, size): bilinear, antialiased when
    shrinking (as PIL's resize), rounded to the nearest integer."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class BatchDecoder:
    """A batch of EncodedImageDataset items -> uint8 (b, channels, size, size) on `device`, in
    the batch's order: the JPEGs decoded together on the device (decode_jpeg with a list),
    images of one original size resized together; host-decoded pixels copied over."""

    def __init__(self, images, channels, size, device, unreadable=None):
        from torchvision.io import ImageReadMode, decode_jpeg
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.images, self.channels, self.size, self.device = images, channels, size, device
        self.unreadable = unreadable

    def decode_jpegs(self, items):
        """[uint8 (3, H, W) on the device or None] for items (index, jpeg bytes); None where
        the device could not decode the file."""
        data = [jpeg for _, jpeg, _ in items]
        if not data:  # a batch without JPEGs (decode_jpeg refuses an empty list)
            return []
        try:
            return self._decode_jpeg(data, mode=self._rgb, device=self.device)
        except RuntimeError:  # one bad file fails the whole list: find it one by one
            decoded = []
            for jpeg in data:
                try:
                    decoded.append(self._decode_jpeg(jpeg, mode=self._rgb, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def __call__(self, batch):
        out = torch.empty((len(batch), self.channels, self.size, self.size), dtype=torch.uint8,
                          device=self.device)
        jpegs = [k for k, (_, jpeg, _) in enumerate(batch) if jpeg is not None]
        by_shape = {}
        for k, rgb in zip(jpegs, self.decode_jpegs([batch[k] for k in jpegs])):
            if rgb is None:  # the host decodes it (PIL) or replaces it, warning with its name
                out[k] = pil_pixels(self.images, batch[k][0], self.channels, self.size,
                                    unreadable=self.unreadable).to(self.device)
            else:
                by_shape.setdefault(tuple(rgb.shape[-2:]), []).append((k, rgb))
        for group in by_shape.values():
            rows = torch.tensor([k for k, _ in group])
            if self.device.type == "cuda":
                rows = rows.pin_memory()  # a copy from pageable memory would wait for the GPU
            rows = rows.to(self.device, non_blocking=True)
            pixels = to_channels(torch.stack([rgb for _, rgb in group]), self.channels)
            out.index_copy_(0, rows, resize_uint8(pixels, self.size))
        for k, (_, jpeg, pixels) in enumerate(batch):
            if jpeg is None:
                out[k].copy_(pixels, non_blocking=True)
        return out


class DecodedTwoViews:
    """The `make_views` of --gpu-decode: (a list batch of EncodedImageDataset, global step) ->
    both views (2b, C, S, S), `decoder` then `two_views` (a DeviceTwoViews)."""

    def __init__(self, decoder, two_views):
        self.decoder, self.two_views = decoder, two_views

    def __call__(self, batch, step):
        return self.two_views(self.decoder(batch), step)
