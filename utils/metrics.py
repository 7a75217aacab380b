"""Classification metrics and the report every evaluation script writes (linear evaluation,
fine-tuning, the supervised baseline): the same numbers, files and names everywhere."""
import csv
import io
import math
import os

import numpy as np

from utils.fileio import atomic_write_bytes, json_dump
from utils.plotfuncs import plot_confusion_matrix


def auroc_one_vs_rest(y_true, probs):
    """Macro AUROC of each class against the rest from probabilities (N, K); NaN (not an error)
    when a class of 0..K-1 has no test image, where AUROC is undefined. K = 2 gives the
    ordinary AUROC of class 1."""
    from sklearn.metrics import roc_auc_score  # imported when used: 1 s of start-up
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro",
                               labels=list(range(n_classes))))


def classification_metrics(y_true, pred, probs):
    """accuracy, balanced accuracy (mean recall over the classes present), macro-F1 over all K
    classes and one-vs-rest AUROC, for labels y_true (N,), predictions pred (N,) and class
    probabilities probs (N, K) whose rows sum to 1."""
    from sklearn.metrics import balanced_accuracy_score, f1_score
    labels = list(range(probs.shape[1]))
    return {"accuracy": float(np.mean(y_true == pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
            "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro",
                                       zero_division=0)),
            "auroc_ovr": auroc_one_vs_rest(y_true, probs)}


def _csv_bytes(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_classification_report(y_true, pred, probs, classes, respath, extra, names=None):
    """Print and save the test report of a classifier in `respath`:

    report.json   per-class precision/recall/F1/support, the metrics of classification_metrics
                  and `extra` (run settings);
    report.csv    the per-class table with accuracy, balanced accuracy, macro-F1 and AUROC rows;
    predictions.csv  index, image, label, prediction and the K class probabilities, so every
                  figure can be recomputed;
    confusion_matrix.csv / .png  rows true class, columns predicted.
    y_true, pred: (N,) ints; probs: (N, K) floats; names: N image names (or None).
    Returns the metrics dict.
    """
    from sklearn.metrics import classification_report, confusion_matrix
    labels = list(range(len(classes)))
    print(classification_report(y_true, pred, labels=labels, target_names=classes, digits=4,
                                zero_division=0))
    report = classification_report(y_true, pred, labels=labels, target_names=classes,
                                   output_dict=True, zero_division=0)
    metrics = classification_metrics(y_true, pred, probs)
    print("  ".join(f"{k} {100 * v:.2f} %" for k, v in metrics.items()), flush=True)
    json_dump({**report, **metrics,
               "auroc_ovr": None if math.isnan(metrics["auroc_ovr"]) else metrics["auroc_ovr"],
               **extra}, os.path.join(respath, "report.json"))
    rows = [[name, f"{report[name]['precision']:.4f}", f"{report[name]['recall']:.4f}",
             f"{report[name]['f1-score']:.4f}", int(report[name]["support"])]
            for name in classes + ["macro avg", "weighted avg"]]
    rows += [[key, "", "", f"{metrics[key]:.4f}", len(y_true)]
             for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr")]
    atomic_write_bytes(os.path.join(respath, "report.csv"), _csv_bytes(
        ["class", "precision", "recall", "f1-score", "support"], rows))
    names = names if names is not None else [""] * len(y_true)
    atomic_write_bytes(os.path.join(respath, "predictions.csv"), _csv_bytes(
        ["index", "image", "label", "prediction"] + [f"p_{c}" for c in classes],
        [[i, names[i], int(y_true[i]), int(pred[i])] + [f"{p:.17g}" for p in probs[i]]
         for i in range(len(y_true))]))
    matrix = confusion_matrix(y_true, pred, labels=labels)
    atomic_write_bytes(os.path.join(respath, "confusion_matrix.csv"), _csv_bytes(
        ["true \\ predicted"] + list(classes),
        [[name] + row.tolist() for name, row in zip(classes, matrix)]))
    plot_confusion_matrix(matrix, classes, os.path.join(respath, "confusion_matrix.png"))
    return metrics
