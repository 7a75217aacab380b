"""What main.py's online probe can reach on a trained model, and why it stays below the offline
probe: on a validation split carved from the training images (as main.py's), the offline probe
(linear_evaluation.py's) fitted on clean h and on augmented h (the online probe's input: h of
main.py's training views), and the online probe's optimisation replayed on the fixed encoder
over the run's epochs of augmented views, standardised (utils.online_probe.OnlineProbe, now)
and on raw h (the probe before the standardisation: AdamW 1e-3 on h).

    python tools/probe_ceiling.py DATAPATH MODELPATH OUT.json [--epochs 14] [-bs 250]

The encoder is fixed here, so the replay is the online probe's ceiling at the end of a run;
during a run the encoder moves under it. The run's own online-probe accuracies are copied from
run.json beside MODELPATH's folder when it is there. Writes {"offline": {"clean", "augmented"},
"replay": {"standardised", "raw"} (accuracy after each epoch), "run": [[epoch, accuracy]],
"split": ...} (accuracies in %).
"""
import argparse
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.data import ImageDataset, make_loader  # noqa: E402
from utils.fileio import json_dump  # noqa: E402
from utils.linear_probe import extract_features, fit_probe  # noqa: E402
from utils.model import load_trained_model  # noqa: E402
from utils.online_probe import PROBE_LR, OnlineProbe  # noqa: E402
from utils.sources import load_split, split_off_validation  # noqa: E402
from utils.transforms import AugmentationSettings, EvalTransform, SimCLRAugmentation  # noqa: E402


def run_settings(modelpath):
    """(run.json of the main.py run that wrote MODELPATH, or {}), its augmentation settings."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(modelpath))), "run.json")
    run = json.load(open(path)) if os.path.exists(path) else {}
    return run, run.get("args", {})


def view_settings(meta, run_args):
    """The AugmentationSettings of the run's training views, resolved as main.py resolves its
    flags (--blur unset: blur above 32 px); main.py's defaults where run.json is missing."""
    blur = run_args.get("blur")
    return AugmentationSettings(
        image_size=meta["image_size"], channels=meta["in_channels"], mean=meta["mean"],
        std=meta["std"], jitter_strength=run_args.get("jitter_strength", 0.5),
        blur=meta["image_size"] > 32 if blur is None else blur,
        min_scale=run_args.get("min_scale", 0.08), preset=run_args.get("aug", "simclr"),
        noise=run_args.get("noise", 0.0), rotate=run_args.get("rotate", 0.0),
        cutout=run_args.get("cutout", 0.0))


def augmented_epochs(encoder, images, settings, epochs, batch_size, channels):
    """[(h (N, F), labels (N,))] of `images` under one fresh draw of the training views per
    epoch (seeded by the epoch), in a shuffled order per epoch."""
    augment = SimCLRAugmentation(settings)
    out = []
    for epoch in range(epochs):
        torch.manual_seed(epoch)
        h, y = extract_features(encoder, make_loader(ImageDataset(images, channels, augment),
                                                     batch_size=batch_size), "cpu")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(100 + epoch))
        out.append((h[order], y[order]))
    return out


def accuracy(logits, y):
    return round(100 * (logits.argmax(1) == y).double().mean().item(), 2)


def offline_accuracy(train, val, n_classes):
    """The offline probe (penalty chosen on held-out train) fitted on `train`, on `val` (%)."""
    probe = fit_probe(*train, n_classes)
    return round(100 * (probe.predict(val[0]) == val[1]).double().mean().item(), 2)


def replay_standardised(epochs, val, n_classes, batch_size):
    """OnlineProbe stepped over the epochs' batches: its validation accuracy after each."""
    probe = OnlineProbe(val[0].shape[1], n_classes, torch.device("cpu"), seed=0)
    result = []
    for h, y in epochs:
        for i in range(0, len(y), batch_size):
            probe.step(h[i:i + batch_size], y[i:i + batch_size])
        result.append(round(100 * probe.accuracy(*val), 2))
    return result


def replay_raw(epochs, val, n_classes, batch_size):
    """The probe before the standardisation: nn.Linear on raw h, AdamW at PROBE_LR."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = torch.nn.Linear(val[0].shape[1], n_classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=PROBE_LR, weight_decay=0.0)
    result = []
    for h, y in epochs:
        for i in range(0, len(y), batch_size):
            optimizer.zero_grad()
            F.cross_entropy(linear(h[i:i + batch_size]), y[i:i + batch_size]).backward()
            optimizer.step()
        with torch.no_grad():
            result.append(accuracy(linear(val[0]), val[1]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datapath", metavar="DATAPATH")
    parser.add_argument("modelpath", metavar="MODELPATH")
    parser.add_argument("out", metavar="OUT.json")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of augmented views replayed (default: the run's)")
    parser.add_argument("-bs", "--batch-size", type=int, default=None,
                        help="the probe's batch (default: the run's)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="held out of each class (main.py's --val-fraction default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run, run_args = run_settings(args.modelpath)
    epochs = args.epochs or run_args.get("epochs", 14)
    batch_size = args.batch_size or run_args.get("batch_size", 250)
    model, meta = load_trained_model(args.modelpath)
    options = types.SimpleNamespace(data_root=None, size=None, download=False, train_list=None,
                                    val_list=None, test_list=None)
    images = load_split(args.datapath, "train", True, options).with_intensity_range(
        meta.get("intensity_range"))
    train, val = split_off_validation(images, args.val_fraction, args.seed)
    channels, n = meta["in_channels"], len(images.classes)
    settings = view_settings(meta, run_args)
    clean = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    train_h, val_h = [extract_features(model.encoder, make_loader(
        ImageDataset(split, channels, clean), batch_size=250), "cpu") for split in (train, val)]
    views = augmented_epochs(model.encoder, train, settings, epochs, 250, channels)

    result = {
        "modelpath": os.path.abspath(args.modelpath),
        "split": {"train": len(train), "val": len(val), "val_fraction": args.val_fraction,
                  "seed": args.seed, "epochs": epochs, "batch_size": batch_size},
        "offline": {"clean": offline_accuracy(train_h, val_h, n),
                    "augmented": offline_accuracy(views[0], val_h, n)},
        "replay": {"standardised": replay_standardised(views, val_h, n, batch_size),
                   "raw": replay_raw(views, val_h, n, batch_size)},
        "run": [[int(e), round(100 * a, 2)] for e, a in run.get("online_probe_accuracy", [])]}
    print(json.dumps(result))
    json_dump(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
