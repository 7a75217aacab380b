"""k-nearest-neighbour evaluation and retrieval on frozen features (cosine similarity)."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def cosine_neighbours(queries, keys, k, chunk=1024, exclude_self=False):
    """Indices (Q, k) and similarities (Q, k) of the k keys most similar to each query.

    queries (Q, D), keys (N, D); similarity = cosine = <q/|q|, x/|x|>, computed for `chunk`
    queries at a time so memory stays at chunk x N; k larger than the keys is cut to N. With
    exclude_self (queries are the keys, in the same order) each query's own row is left out.
    Ties: the lower key index first.
    """
    q = F.normalize(queries.float(), dim=1)
    x = F.normalize(keys.float(), dim=1)
    k = min(k, x.shape[0] - (1 if exclude_self else 0))
    all_idx, all_sim = [], []
    for start in range(0, q.shape[0], chunk):
        sim = q[start:start + chunk] @ x.T  # (c, N)
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = float("-inf")
        # a stable sort puts equal similarities in key order, as a brute-force search does
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        all_idx.append(order)
        all_sim.append(torch.gather(sim, 1, order))
    return torch.cat(all_idx), torch.cat(all_sim)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, n_classes, k=20):
    """Majority vote of the k cosine-nearest training samples of each test sample.

    train_features (N, D), train_labels (N,) int, test_features (M, D) -> predictions (M,).
    Every neighbour has one vote; a tie goes to the lowest class index (as scikit-learn's
    KNeighborsClassifier with uniform weights does).
    """
    idx, _ = cosine_neighbours(test_features, train_features, k)
    votes = F.one_hot(train_labels[idx], n_classes).sum(1)  # (M, n_classes)
    return votes.argmax(1)  # argmax returns the first maximum: the lowest tied class


def knn_accuracy(train_features, train_labels, test_features, test_labels, n_classes, k=20):
    """Fraction of test samples whose kNN prediction (knn_predict) equals their label."""
    pred = knn_predict(train_features, train_labels, test_features, n_classes, k)
    return (pred == test_labels).double().mean().item()
