"""Judge a pretraining recipe without looking at the test split: the linear probe and the kNN
accuracy of h on a validation split carved from the training images, beside the same two
evaluations of the references (the same network randomly initialised, the raw pixels).

    python tools/val_eval.py DATAPATH MODELPATH OUT.json [--val-fraction 0.2] [--references]

The validation images are --val-fraction of every class of DATAPATH's train split, chosen by
--seed (utils.sources.split_off_validation); the probe (linear_evaluation.py's, at weight decay
1e-4 and with its weight decay chosen on held-out training images) is fitted and the kNN
memory (k 20, cosine, majority vote) built on the rest. Pretraining may have seen the
validation images (unlabelled, as it sees every training image); their labels are used here
only. Writes {"simclr": {"probe", "probe_chosen", "weight_decay", "knn"}, ["random": ...,
"pixels": ...], "split": ...} to OUT.json (accuracies in %).
"""
import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.data import ImageDataset, make_loader  # noqa: E402
from utils.fileio import json_dump  # noqa: E402
from utils.knn import knn_accuracy  # noqa: E402
from utils.linear_probe import extract_features, fit_probe  # noqa: E402
from utils.model import build_encoder, load_trained_model  # noqa: E402
from utils.sources import load_split, split_off_validation  # noqa: E402
from utils.transforms import EvalTransform  # noqa: E402


def features(encoder, meta, splits):
    """[(features (N, F), labels (N,))] of `encoder` (None: the flattened pixels) on `splits`."""
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    encoder = torch.nn.Flatten() if encoder is None else encoder
    return [extract_features(encoder, make_loader(ImageDataset(split, meta["in_channels"],
                                                               transform), batch_size=250),
                             torch.device("cpu")) for split in splits]


def scores(pair, n_classes, k):
    """{"probe", "probe_chosen", "weight_decay", "knn"}: validation accuracies (%) of features
    fitted / remembered on train: the probe at weight decay 1e-4 (linear_evaluation.py's
    earlier default), the probe whose weight decay was chosen on held-out train features (its
    default now) and that weight decay, the kNN vote."""
    (train_x, train_y), (val_x, val_y) = pair

    def accuracy(probe):
        return round(100 * (probe.predict(val_x) == val_y).double().mean().item(), 2)
    chosen = fit_probe(train_x, train_y, n_classes)
    return {"probe": accuracy(fit_probe(train_x, train_y, n_classes, weight_decay=1e-4)),
            "probe_chosen": accuracy(chosen), "weight_decay": chosen.weight_decay,
            "knn": round(100 * knn_accuracy(train_x, train_y, val_x, val_y, n_classes, k), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datapath", metavar="DATAPATH")
    parser.add_argument("modelpath", metavar="MODELPATH")
    parser.add_argument("out", metavar="OUT.json")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--references", action="store_true",
                        help="also the random encoder (seed 0) and the raw pixels")
    args = parser.parse_args(argv)
    options = types.SimpleNamespace(data_root=None, size=None, download=False, train_list=None,
                                    val_list=None, test_list=None)
    model, meta = load_trained_model(args.modelpath)
    images = load_split(args.datapath, "train", True, options).with_intensity_range(
        meta.get("intensity_range"))  # scaled as the model was trained
    splits = split_off_validation(images, args.val_fraction, args.seed)
    n = len(images.classes)
    result = {"modelpath": os.path.abspath(args.modelpath),
              "split": {"train": len(splits[0]), "val": len(splits[1]),
                        "val_fraction": args.val_fraction, "seed": args.seed, "knn_k": args.knn_k},
              "simclr": scores(features(model.encoder, meta, splits), n, args.knn_k)}
    if args.references:
        torch.manual_seed(0)
        random_encoder = build_encoder(meta["arch"], meta["in_channels"], meta["stem"])[0].eval()
        result["random"] = scores(features(random_encoder, meta, splits), n, args.knn_k)
        result["pixels"] = scores(features(None, meta, splits), n, args.knn_k)
    print(result)
    json_dump(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
