"""Figures drawn from saved arrays. Nothing here reads command-line arguments."""
import warnings

import numpy as np

from utils.fileio import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn (the
    import costs 0.7 s of every script's start-up otherwise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a matplotlib figure to `path` as PNG (120 dpi) atomically and close it."""
    plt = pyplot()
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_training_losses(step_losses, steps_per_epoch, path, knn=None, online_probe=None):
    """Loss per step and the per-epoch mean (at each epoch's last step) against the step;
    `knn` and `online_probe` [(epoch, accuracy), ...] add the kNN and online-probe accuracies
    of h (on the kNN query images) on a second axis."""
    plt = pyplot()
    step_losses = np.asarray(step_losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(step_losses) + 1)
    ax.plot(steps, step_losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss per step")
    n_epochs = len(step_losses) // steps_per_epoch
    if n_epochs:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an epoch of skipped fp16 steps
            means = np.nanmean(step_losses[:n_epochs * steps_per_epoch].reshape(n_epochs, -1), 1)
        ax.plot(np.arange(1, n_epochs + 1) * steps_per_epoch, means, "o-", color="tab:orange",
                label="mean loss per epoch")
    ax.set_xlabel(f"training step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("SimCLR pretraining loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracies = [(np.asarray(rows, dtype=float), style, label) for rows, style, label in (
        (knn, ("s--", "tab:green"), "kNN accuracy of h"),
        (online_probe, ("^:", "tab:red"), "online probe accuracy of h"))
        if rows is not None and len(rows)]
    if accuracies:
        ax2 = ax.twinx()
        for rows, (marker, colour), label in accuracies:
            ax2.plot(rows[:, 0] * steps_per_epoch, 100 * rows[:, 1], marker, color=colour,
                     label=label)
        ax2.set_ylabel("accuracy (%)")
        extra_handles, extra_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
    ax.legend(handles, labels)
    save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names, path, title="Confusion matrix (test)"):
    """Seaborn heatmap of a (K, K) confusion matrix; rows true class, columns predicted."""
    plt = pyplot()
    import seaborn as sns
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.5 * k))
    sns.heatmap(matrix, annot=k <= 20, fmt="d", cmap="Blues", xticklabels=class_names,
                yticklabels=class_names, ax=ax, cbar=True)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    save_figure(fig, path)


def plot_accuracy_vs_layer(removed_layers, accuracies, path):
    """Test accuracy of the linear probe against the number of head layers removed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(removed_layers, np.asarray(accuracies) * 100, "o-", label="linear probe accuracy")
    depth = max(removed_layers)
    ax.set_xticks(removed_layers)
    ax.set_xticklabels([f"{n}\n" + ("(h)" if n == depth else "(z)" if n == 0 else "")
                        for n in removed_layers])
    ax.set_xlabel("projection-head layers removed (--remove_top_layers)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_accuracy_vs_epoch(epochs, accuracy_h, accuracy_z, path):
    """Test accuracy of the linear probe on h and on z against the pretraining epoch of each
    snapshot (dmolony3's table as a figure)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, np.asarray(accuracy_h) * 100, "o-", label="h (encoder output)")
    ax.plot(epochs, np.asarray(accuracy_z) * 100, "s--", label="z (projection head output)")
    ax.set_xlabel("pretraining epoch of the snapshot")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def class_colours(n_classes):
    """One distinct colour per class: tab10 up to 10 classes, tab20 up to 20, else a hue wheel."""
    plt = pyplot()
    if n_classes <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n_classes)]
    if n_classes <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n_classes)]
    return [plt.get_cmap("hsv")(i / n_classes) for i in range(n_classes)]


def _scatter_classes(ax, points, labels, class_names, colours, size):
    """Draw points (N, 2) on `ax`, one colour and legend entry per class present."""
    points, labels = np.asarray(points, dtype=float), np.asarray(labels)
    for c, name in enumerate(class_names):
        members = labels == c
        if members.any():
            ax.scatter(points[members, 0], points[members, 1], s=size, color=colours[c],
                       label=name, alpha=0.8, linewidths=0)


def _point_size(n_points):
    return float(np.clip(3000 / max(n_points, 1), 4, 40))


def plot_class_scatter(points, labels, class_names, path, title="", axis_labels=("", "")):
    """Scatter plot of 2-D points (N, 2) coloured by class, with a legend of class names.

    labels (N,) int index `class_names`; axis_labels (x label, y label).
    """
    plt = pyplot()
    colours = class_colours(len(class_names))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    _scatter_classes(ax, points, labels, class_names, colours, _point_size(len(points)))
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small",
              markerscale=1.5, ncol=1 if len(class_names) <= 20 else 2)
    save_figure(fig, path)


def plot_tsne_sweep(train_points, train_labels, test_points, test_labels, perplexities,
                    class_names, path, title=""):
    """Grid of 2-D embeddings: one row per perplexity, columns train and test.

    train_points / test_points: lists (R entries, one per row) of (N, 2) / (M, 2) arrays;
    train_labels (N,) and test_labels (M,) int index `class_names`; perplexities (R, 2): the
    perplexity used for the train and the test panel of each row. One legend of class names
    for the whole figure.
    """
    plt = pyplot()
    perplexities = np.asarray(perplexities, dtype=float).reshape(-1, 2)
    rows = len(perplexities)
    colours = class_colours(len(class_names))
    fig, axes = plt.subplots(rows, 2, figsize=(9, 4 * rows), squeeze=False)
    for r in range(rows):
        for col, (split, points, labels) in enumerate(
                (("train", train_points[r], train_labels), ("test", test_points[r], test_labels))):
            ax = axes[r, col]
            _scatter_classes(ax, points, labels, class_names, colours, _point_size(len(points)))
            ax.set_title(f"{split} ({len(points)} points), perplexity {perplexities[r, col]:g}")
            ax.set_xticks([])
            ax.set_yticks([])
    handles, names = [], []
    for ax in axes.ravel():  # a class may be missing from one panel
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    order = [names.index(n) for n in class_names if n in names]
    fig.legend([handles[i] for i in order], [names[i] for i in order], title="class",
               loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=1.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def show_image(ax, image):
    """An image (H, W) grayscale or (H, W, 3) RGB with values in [0, 1], without axes."""
    image = np.asarray(image)
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image, 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_retrieval_grid(query_images, query_names, neighbour_images, neighbour_names,
                        similarities, path, title=""):
    """Retrieval grid: one row per query, the query then its neighbours in rank order.

    query_images (Q, H, W) or (Q, H, W, 3) and neighbour_images (Q, K, H, W[, 3]) in [0, 1]
    (grayscale drawn with cmap gray); query_names (Q,) and neighbour_names (Q, K) class names;
    similarities (Q, K). A neighbour's title (class and similarity) is green when its class is
    the query's, red otherwise.
    """
    plt = pyplot()
    similarities = np.asarray(similarities, dtype=float)
    n_queries, k = similarities.shape
    fig, axes = plt.subplots(n_queries, k + 1, figsize=(1.6 * (k + 1), 1.8 * n_queries),
                             squeeze=False)
    for q in range(n_queries):
        ax = axes[q, 0]
        show_image(ax, query_images[q])
        ax.set_title(f"query\n{query_names[q]}", fontsize=8, fontweight="bold")
        for r in range(k):
            ax = axes[q, r + 1]
            show_image(ax, neighbour_images[q][r])
            match = neighbour_names[q][r] == query_names[q]
            ax.set_title(f"{neighbour_names[q][r]}\n{similarities[q, r]:.3f}", fontsize=8,
                         color="tab:green" if match else "tab:red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_finetune_curves(epoch_losses, val_scores, path, title="Fine-tuning", start_score=None):
    """Training loss (left axis) and validation accuracy (right axis) per epoch; `start_score`
    is the validation accuracy of the starting point (epoch 0, e.g. the probe head) or None."""
    plt = pyplot()
    epochs = np.arange(1, len(epoch_losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, epoch_losses, "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    val_scores = np.asarray(val_scores, dtype=float)
    validated = np.isfinite(val_scores)  # NaN: an epoch without validation (--val-every)
    x, y = epochs[:len(val_scores)][validated], 100 * val_scores[validated]
    if start_score is not None:
        x, y = np.concatenate([[0], x]), np.concatenate([[100 * start_score], y])
    ax2.plot(x, y, "s--", color="tab:green", label="validation accuracy")
    ax2.set_ylabel("validation accuracy (%)")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = ax2.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="center right")
    ax.set_title(title)
    save_figure(fig, path)


METHOD_NAMES = {"linear": "SimCLR, linear probe", "finetune": "SimCLR, fine-tuned",
                "frozen": "SimCLR, frozen encoder + head", "baseline": "supervised from scratch",
                "pixels": "raw pixels, linear probe", "random": "random encoder, linear probe"}
REFERENCE_METHODS = ("pixels", "random")


def plot_label_efficiency(rows, path):
    """Test accuracy (mean, error bars +- std over seeds) against labelled images per class, log
    x axis, one line per method (the references dashed); `rows` as written by
    label_efficiency.py."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = sorted((r for r in rows if r["method"] == method),
                      key=lambda r: r["labels_per_class"])
        x = [r["labels_per_class"] for r in mine]
        mean = np.array([r["accuracy_mean"] for r in mine]) * 100
        std = np.array([r["accuracy_std"] for r in mine]) * 100
        ax.errorbar(x, mean, yerr=std, fmt="s--" if method in REFERENCE_METHODS else "o-",
                    capsize=3, alpha=0.7 if method in REFERENCE_METHODS else 1.0,
                    label=METHOD_NAMES.get(method, method))
    ax.set_xscale("log")
    budgets = sorted({row["labels_per_class"] for row in rows})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
