"""Export the encoder of a trained SimCLR model for use without this toolkit.

    python export.py MODELPATH OUT

MODELPATH is the model.pth or checkpoint.pth main.py wrote. Writes

    OUT.pth  {"state_dict": the encoder's weights under torchvision's own names (no projection
             head, no `module.` or `encoder.` prefix), "meta": {arch, stem, conv1, in_channels,
             image_size, mean, std, intensity_range, feature_dim, source_checkpoint, torch,
             torchvision, how_to_load}}; intensity_range [low, high] is how 16-bit and float
             images were scaled to [0, 1] before mean and std (None: 8-bit data, / 255). It
             loads with strict=True into torchvision.models.<arch>(weights=None) whose conv1 is
             rebuilt from meta["conv1"] for meta["in_channels"], whose maxpool is nn.Identity()
             for the 'cifar' and 'half' stems and whose fc is nn.Identity(): the 7 lines in
             meta["how_to_load"] and the README; utils.model.build_torchvision_backbone(meta)
             builds the same module.
    OUT.pt2  the same encoder as a torch.export program, meta.json inside:
             torch.export.load("OUT.pt2").module()(x) gives h (B, feature_dim) for a batch x
             (B, in_channels, image_size, image_size) normalised with meta's mean and std, any B.

Why torch.export and not TorchScript: with the torch this project pins (2.14), torch.jit.trace and
torch.jit.load both warn that TorchScript is deprecated and point to torch.export. A .pt2 file
loads with plain torch alone (no torchvision, no code of this toolkit, nothing unpickled) and
keeps the batch size free. It needs a torch at least as new as the one that wrote it, holds
BatchNorm in eval mode already, and its module refuses .eval() / .train() ("not supported").

Before writing, both are checked against the model on a random batch: the torchvision module
and the exported program must give the model's h to within 1e-5 of max |h| (printed).
OUT may be given with or without .pth.
"""
import argparse
import io
import json
import os

import torch
import torchvision

from utils.fileio import atomic_torch_save, atomic_write_bytes
from utils.cli import add_weight_description_args, ensure_writable_dir, print_args, run_main
from utils.foreign_weights import WeightSettings
from utils.model import FEATURE_DIMS, build_torchvision_backbone, load_trained_model

TOLERANCE = 1e-5
CHECK_BATCH = 4

HOW_TO_LOAD = """\
import torch, torchvision
saved = torch.load("{name}", weights_only=True); meta = saved["meta"]
net = getattr(torchvision.models, meta["arch"])(weights=None)
net.conv1 = torch.nn.Conv2d(meta["in_channels"], 64, **meta["conv1"], bias=False)
if meta["stem"] != "imagenet": net.maxpool = torch.nn.Identity()
net.fc = torch.nn.Identity()
net.load_state_dict(saved["state_dict"], strict=True); net.eval()
"""


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Export the encoder of a SimCLR model: a torchvision state dict (OUT.pth) "
                    "and a torch.export program (OUT.pt2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("modelpath", metavar="MODELPATH",
                        help="model.pth or checkpoint.pth written by main.py")
    parser.add_argument("out", metavar="OUT",
                        help="output name: writes OUT.pth and OUT.pt2 (a trailing .pth or .pt2 "
                             "is dropped)")
    add_weight_description_args(parser)
    return parser


def output_paths(out):
    """(OUT.pth, OUT.pt2) for OUT given with or without .pth / .pt2."""
    base = os.path.splitext(out)[0] if out.endswith((".pth", ".pt2")) else out
    return base + ".pth", base + ".pt2"


def backbone_meta(meta, encoder, modelpath, state_path):
    """The "meta" dict of OUT.pth: everything needed to rebuild, feed and trace the encoder."""
    conv1 = encoder.conv1
    return {"arch": meta["arch"], "stem": meta["stem"],
            "conv1": {"kernel_size": conv1.kernel_size[0], "stride": conv1.stride[0],
                      "padding": conv1.padding[0]},
            "in_channels": meta["in_channels"], "image_size": meta["image_size"],
            "mean": list(meta["mean"]), "std": list(meta["std"]),
            "intensity_range": meta.get("intensity_range"),
            "feature_dim": FEATURE_DIMS[meta["arch"]],
            "source_checkpoint": os.path.abspath(modelpath),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "how_to_load": HOW_TO_LOAD.format(name=os.path.basename(state_path))}


def export_program(encoder, example):
    """torch.export of `encoder` (eval mode) with a free batch dimension, for inputs shaped
    like `example` (B, C, S, S)."""
    batch = torch.export.Dim("batch")
    return torch.export.export(encoder, (example,), dynamic_shapes=({0: batch},))


@torch.no_grad()
def relative_difference(reference, other, x):
    """max |reference(x) - other(x)| / max(1, max |reference(x)|): the largest difference in
    units of the features' own scale (float32 rounding grows with it), as a float."""
    expected = reference(x)
    return ((expected - other(x)).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def main(args):
    state_path, program_path = output_paths(args.out)
    ensure_writable_dir(os.path.dirname(os.path.abspath(state_path)), "the folder of OUT")
    print_args(args)
    model, meta = load_trained_model(args.modelpath, settings=WeightSettings.from_args(args))
    encoder = model.encoder
    state_dict = {k: v.clone() for k, v in encoder.state_dict().items()}
    exported_meta = backbone_meta(meta, encoder, args.modelpath, state_path)

    x = torch.randn(CHECK_BATCH, meta["in_channels"], meta["image_size"], meta["image_size"],
                    generator=torch.Generator().manual_seed(0))
    plain = build_torchvision_backbone(exported_meta)
    plain.load_state_dict(state_dict, strict=True)
    program = export_program(encoder, x[:2])
    differences = {"torchvision": relative_difference(encoder, plain.eval(), x),
                   "torch.export": relative_difference(encoder, program.module(), x)}
    print(f"max |difference| from the model's h on {CHECK_BATCH} random inputs, relative to "
          f"max |h|: " + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()),
          flush=True)
    for name, value in differences.items():
        if not value <= TOLERANCE:
            raise RuntimeError(f"the {name} copy of the encoder differs from the model by "
                               f"{value:.2e} > {TOLERANCE}; this is a bug, please report it")

    atomic_torch_save({"state_dict": state_dict, "meta": exported_meta}, state_path)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"meta.json": json.dumps(exported_meta)})
    atomic_write_bytes(program_path, buffer.getvalue())
    print(f"wrote {state_path} ({os.path.getsize(state_path) / 1e6:.1f} MB, {len(state_dict)} "
          f"tensors) and {program_path} ({os.path.getsize(program_path) / 1e6:.1f} MB): "
          f"{meta['arch']}, {meta['stem']} stem, input ({meta['in_channels']}, "
          f"{meta['image_size']}, {meta['image_size']}), h of {exported_meta['feature_dim']}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
