"""Figures drawn from saved arrays. Nothing here reads command-line arguments."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.checkpoint import atomic_write_bytes  # noqa: E402


def _save(fig, path):
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_training_losses(step_losses, steps_per_epoch, path):
    """Loss per step and the per-epoch mean (at each epoch's last step) against the step."""
    step_losses = np.asarray(step_losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(step_losses) + 1)
    ax.plot(steps, step_losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss per step")
    n_epochs = len(step_losses) // steps_per_epoch
    if n_epochs:
        means = step_losses[:n_epochs * steps_per_epoch].reshape(n_epochs, -1).mean(1)
        ax.plot(np.arange(1, n_epochs + 1) * steps_per_epoch, means, "o-", color="tab:orange",
                label="mean loss per epoch")
    ax.set_xlabel(f"training step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("SimCLR pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_confusion_matrix(matrix, class_names, path, title="Confusion matrix (test)"):
    """Seaborn heatmap of a (K, K) confusion matrix; rows true class, columns predicted."""
    import seaborn as sns
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.5 * k))
    sns.heatmap(matrix, annot=k <= 20, fmt="d", cmap="Blues", xticklabels=class_names,
                yticklabels=class_names, ax=ax, cbar=True)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    _save(fig, path)


def plot_accuracy_vs_layer(removed_layers, accuracies, path):
    """Test accuracy of the linear probe against the number of head layers removed."""
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
    _save(fig, path)
