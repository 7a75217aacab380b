"""Feature analysis of a SimCLR model: PCA and t-SNE maps, kNN accuracy and nearest-neighbour
retrieval, for both the encoder output h and the projection z.

    python feature_analysis.py DATAPATH MODELPATH OUTDIR -bs 250 -c --k 20 --queries 8 \
        --topk 5 [--tsne --perplexities 5 15 30 50] [--max-points 2000]

DATAPATH and MODELPATH are read as by linear_evaluation.py (a folder with train/ and test/ of
the same class folders, a MedMNIST .npz file or name, or path lists; the model.pth or
checkpoint.pth main.py wrote). The features of both labelled splits are computed once, with
no augmentation (resize, centre crop, the stored normalisation), the model in eval mode.
OUTDIR receives:

    pca_h.png, pca_z.png     test features on the first two principal axes of the train
                             features, coloured by class
    tsne_h.png, tsne_z.png   t-SNE of the test features (--perplexity)
    tsne_sweep_h.png, ...z   with --tsne: t-SNE of train and test side by side, one row per
                             --perplexities value
    retrieval.png / .csv     --queries test images and their --topk nearest train images in h
    analysis.json            kNN accuracies (cosine, --k) of h and z, PCA explained variance
"""
import argparse
import csv
import io
import os

import numpy as np
import torch

from utils.errors import UserError, warn
from utils.fileio import atomic_write_bytes, json_dump
from utils.cli import (add_data_loading_args, add_data_source_args,
                       add_labelled_data_and_model_args, add_weight_description_args,
                       ensure_writable_dir, note_one_device, print_args, run_main, select_device,
                       ONE_DEVICE_HELP)
from utils.data import ImageDataset, derive_seed, make_loader, warn_if_colour_dropped
from utils.foreign_weights import WeightSettings
from utils.knn import cosine_neighbours, knn_accuracy
from utils.linear_probe import extract_features
from utils.model import load_trained_model
from utils.sources import labelled_train_test
from utils.plotfuncs import plot_class_scatter, plot_retrieval_grid, plot_tsne_sweep
from utils.transforms import EvalTransform, denormalize

# random streams of this script (utils.data.derive_seed), apart from those of the data loaders
TSNE_SUBSET_STREAM, QUERY_STREAM = 11, 12
REPRESENTATIONS = ("h", "z")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Feature analysis: PCA, t-SNE, kNN accuracy and retrieval on frozen "
                    "SimCLR features h (encoder) and z (projection head).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_labelled_data_and_model_args(parser, "outdir", "folder for the figures, CSV and JSON")
    add_data_loading_args(parser, batch_size=250,
                          multiple_gpus_help=ONE_DEVICE_HELP)
    add_data_source_args(parser)
    group = parser.add_argument_group("analysis")
    group.add_argument("--k", type=int, default=20,
                       help="neighbours of the kNN vote (cosine similarity, train split as the "
                            "memory, test split evaluated)")
    group.add_argument("--queries", type=int, default=8,
                       help="test images in the retrieval grid, chosen by --seed")
    group.add_argument("--topk", type=int, default=5,
                       help="nearest train images (cosine in h) shown for each query")
    group.add_argument("--perplexity", type=float, default=30.0,
                       help="t-SNE perplexity of tsne_h/z.png (clipped to n_points - 1)")
    group.add_argument("--tsne", action="store_true",
                       help="also sweep --perplexities, embedding train and test separately: "
                            "tsne_sweep_h.png, tsne_sweep_z.png")
    group.add_argument("--perplexities", type=float, nargs="+", default=[5.0, 15.0, 30.0, 50.0],
                       help="t-SNE perplexities of the --tsne sweep (each clipped to "
                            "n_points - 1)")
    group.add_argument("--max-points", type=int, default=2000,
                       help="t-SNE only: embed at most N images of each split, a random subset "
                            "chosen by --seed (t-SNE time grows fast with N); PCA, kNN and "
                            "retrieval always use every image")
    add_weight_description_args(parser)
    return parser


def check_args(args):
    """UserError for flag values no analysis can use (before anything slow)."""
    if args.k < 1:
        raise UserError(f"--k {args.k}: the kNN vote needs at least 1 neighbour, e.g. --k 20")
    if args.queries < 1:
        raise UserError(f"--queries {args.queries}: show at least 1 query, e.g. --queries 8")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: show at least 1 neighbour, e.g. --topk 5")
    if args.max_points < 2:
        raise UserError(f"--max-points {args.max_points}: t-SNE needs at least 2 points, "
                        f"e.g. --max-points 2000")
    for p in [args.perplexity] + list(args.perplexities):
        if not p > 0:
            raise UserError(f"t-SNE perplexity {p} must be > 0, e.g. 30")
    if args.batch_size < 1:
        raise UserError(f"-bs {args.batch_size} must be at least 1")


def check_split_sizes(n_train, n_test, args):
    """UserError when the splits are too small for the requested analysis."""
    if n_train < 2 or n_test < 2:
        raise UserError(f"the train and test splits have {n_train} and {n_test} images; "
                        f"PCA and t-SNE need at least 2 in each")
    if args.k > n_train:
        raise UserError(f"--k {args.k} is larger than the {n_train} train images (the kNN "
                        f"memory); use --k {n_train} or less")
    if args.topk > n_train:
        raise UserError(f"--topk {args.topk} is larger than the {n_train} train images; use "
                        f"--topk {n_train} or less")


@torch.no_grad()
def extract_h_z(model, loader, device, chunk=4096):
    """Features of every image of `loader`: (h (N, F), z (N, P), labels (N,)), on the CPU.

    h = model.encoder(x) (channels_last, on `device`, eval mode), z = model.head(h) (eval mode,
    on the CPU, `chunk` rows at a time). The encoder is moved to `device`.
    """
    encoder = model.encoder.to(device, memory_format=torch.channels_last)
    h, labels = extract_features(encoder, loader, device, channels_last=True,
                                 desc="features")
    head = model.head.eval()
    z = torch.cat([head(h[i:i + chunk]).float() for i in range(0, len(h), chunk)])
    return h, z, labels


def subsample(n, max_points, seed, split):
    """Sorted indices of at most `max_points` of `n` items, chosen by (seed, split number)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(derive_seed(TSNE_SUBSET_STREAM, seed, split))
    return np.sort(rng.choice(n, size=max_points, replace=False))


def tsne_embed(features, perplexity, seed):
    """2-D t-SNE (PCA init) of features (N, D) -> ((N, 2), perplexity used: clipped < N)."""
    from sklearn.manifold import TSNE

    used = float(min(perplexity, len(features) - 1))
    emb = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto",
               random_state=seed).fit_transform(np.asarray(features, dtype=np.float32))
    return emb, used


def pca_maps(feats, labels, classes, args):
    """PCA fitted on train, test drawn: writes pca_{h,z}.png; {rep: explained ratios (2,)}."""
    from sklearn.decomposition import PCA

    ratios = {}
    for rep in REPRESENTATIONS:
        pca = PCA(n_components=2, random_state=args.seed).fit(feats[rep]["train"].numpy())
        ratios[rep] = [float(r) for r in pca.explained_variance_ratio_]
        points = pca.transform(feats[rep]["test"].numpy())
        plot_class_scatter(points, labels["test"], classes,
                           os.path.join(args.outdir, f"pca_{rep}.png"),
                           title=f"PCA of {rep} (fitted on train, {len(points)} test images)",
                           axis_labels=(f"PC1 ({100 * ratios[rep][0]:.1f} % of variance)",
                                        f"PC2 ({100 * ratios[rep][1]:.1f} % of variance)"))
        print(f"PCA {rep}: explained variance ratio {ratios[rep][0]:.4f}, {ratios[rep][1]:.4f}",
              flush=True)
    return ratios


def tsne_maps(feats, labels, classes, args):
    """t-SNE figures (see module docstring); returns what was used, for analysis.json."""
    chosen = {split: subsample(len(labels[split]), args.max_points, args.seed, number)
              for number, split in enumerate(("train", "test"))}
    sub_labels = {split: labels[split][chosen[split]] for split in chosen}
    info = {"n_points": {split: len(chosen[split]) for split in chosen}}
    for rep in REPRESENTATIONS:
        test_x = feats[rep]["test"].numpy()[chosen["test"]]
        emb, used = tsne_embed(test_x, args.perplexity, args.seed)
        info["perplexity"] = used
        plot_class_scatter(emb, sub_labels["test"], classes,
                           os.path.join(args.outdir, f"tsne_{rep}.png"),
                           title=f"t-SNE of {rep}, {len(emb)} test images, perplexity {used:g}",
                           axis_labels=("t-SNE 1", "t-SNE 2"))
        print(f"t-SNE {rep}: {len(emb)} test points, perplexity {used:g}", flush=True)
    if not args.tsne:
        return info
    for rep in REPRESENTATIONS:
        points = {"train": [], "test": []}
        used = []
        for perplexity in args.perplexities:
            row = []
            for split in ("train", "test"):
                x = feats[rep][split].numpy()[chosen[split]]
                emb, p = tsne_embed(x, perplexity, args.seed)
                points[split].append(emb)
                row.append(p)
            used.append(row)
            print(f"t-SNE sweep {rep}: perplexity {perplexity:g} (used {row[0]:g} train, "
                  f"{row[1]:g} test)", flush=True)
        plot_tsne_sweep(points["train"], sub_labels["train"], points["test"], sub_labels["test"],
                        used, classes, os.path.join(args.outdir, f"tsne_sweep_{rep}.png"),
                        title=f"t-SNE of {rep}: train and test embedded separately")
        info["sweep"] = [{"requested": p, "train": t, "test": q}
                         for p, (t, q) in zip(args.perplexities, used)]
    return info


def display_images(images, indices, meta, transform):
    """Images `indices` of `images`, evaluation-transformed then denormalised, as a numpy array
    (B, H, W) for grayscale or (B, H, W, 3) for RGB, values in [0, 1]."""
    dataset = ImageDataset(images, meta["in_channels"], transform)
    batch = torch.stack([dataset[int(i)][0] for i in indices])
    pixels = denormalize(batch, meta["mean"], meta["std"]).numpy()
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)


def retrieval(train_h, test_h, train_images, test_images, meta, transform, args):
    """Writes retrieval.png and retrieval.csv; returns the query indices (Q,) of the test split."""
    classes = train_images.classes
    n_queries = min(args.queries, len(test_images))
    if n_queries < args.queries:
        warn(f"--queries {args.queries}: the test split has only {len(test_images)} images; "
             f"showing all of them")
    rng = np.random.default_rng(derive_seed(QUERY_STREAM, args.seed))
    queries = np.sort(rng.choice(len(test_images), size=n_queries, replace=False))
    idx, sim = cosine_neighbours(test_h[torch.as_tensor(queries)], train_h, args.topk)
    idx, sim = idx.numpy(), sim.numpy()
    query_names = [classes[test_images.labels[q]] for q in queries]
    neighbour_names = [[classes[train_images.labels[j]] for j in row] for row in idx]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query_index", "query_class", "rank", "train_index", "train_class",
                     "similarity"])
    for q, query in enumerate(queries):
        for rank in range(idx.shape[1]):
            writer.writerow([int(query), query_names[q], rank + 1, int(idx[q, rank]),
                             neighbour_names[q][rank], f"{sim[q, rank]:.6f}"])
    atomic_write_bytes(os.path.join(args.outdir, "retrieval.csv"), buffer.getvalue().encode())

    query_pixels = display_images(test_images, queries, meta, transform)
    neighbour_pixels = display_images(train_images, idx.ravel(), meta, transform)
    neighbour_pixels = neighbour_pixels.reshape(idx.shape + neighbour_pixels.shape[1:])
    plot_retrieval_grid(query_pixels, query_names, neighbour_pixels, neighbour_names, sim,
                        os.path.join(args.outdir, "retrieval.png"),
                        title=f"nearest train images in h (cosine), top {idx.shape[1]}")
    return queries


def main(args):
    check_args(args)
    device = select_device(args.cuda)
    note_one_device(args, "feature extraction")
    ensure_writable_dir(args.outdir, "OUTDIR")
    print_args(args)
    model, meta = load_trained_model(args.modelpath, settings=WeightSettings.from_args(args))
    train_images, test_images = (images.with_intensity_range(meta.get("intensity_range"))
                                 for images in labelled_train_test(args))
    warn_if_colour_dropped(train_images, meta["in_channels"], f"DATAPATH {args.datapath}")
    check_split_sizes(len(train_images), len(test_images), args)
    classes = train_images.classes

    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    feats, labels = {rep: {} for rep in REPRESENTATIONS}, {}
    for split, images in (("train", train_images), ("test", test_images)):
        loader = make_loader(ImageDataset(images, meta["in_channels"], transform),
                             batch_size=args.batch_size, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda")
        feats["h"][split], feats["z"][split], y = extract_h_z(model, loader, device)
        labels[split] = y.numpy()
    print(f"features: h {tuple(feats['h']['train'].shape[1:])}, z "
          f"{tuple(feats['z']['train'].shape[1:])}; {len(labels['train'])} train, "
          f"{len(labels['test'])} test images", flush=True)

    knn = {"k": args.k}
    for rep in REPRESENTATIONS:
        knn[rep] = knn_accuracy(feats[rep]["train"], torch.as_tensor(labels["train"]),
                                feats[rep]["test"], torch.as_tensor(labels["test"]),
                                len(classes), args.k)
    print(f"kNN accuracy (k={args.k}, cosine, test): h {100 * knn['h']:.2f} %, "
          f"z {100 * knn['z']:.2f} %", flush=True)

    ratios = pca_maps(feats, labels, classes, args)
    queries = retrieval(feats["h"]["train"], feats["h"]["test"], train_images, test_images,
                        meta, transform, args)
    tsne = tsne_maps(feats, labels, classes, args)
    json_dump({"knn": knn, "pca_explained_variance": ratios, "tsne": tsne,
               "retrieval_queries": [int(q) for q in queries],
               "feature_dims": {rep: int(feats[rep]["train"].shape[1])
                                for rep in REPRESENTATIONS},
               "n_train": len(labels["train"]), "n_test": len(labels["test"]),
               "classes": list(classes), "modelpath": os.path.abspath(args.modelpath),
               "args": vars(args)}, os.path.join(args.outdir, "analysis.json"))
    print(f"analysis written to {args.outdir}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
