"""Split a labelled data set across federated clients (FIPA_SPEC 5.3).

Every partitioner is a pure function of ``(labels, num_clients, ..., rng)``: all randomness comes from the
``np.random.Generator`` passed in (make it with ``fipa.seeding.numpy_rng(seed, DATA, ...)``), so the same
generator state always yields the same split. Each returns ``list[np.ndarray]``: one sorted ``int64`` array
of sample indices per client; no index is ever given to two clients.

Labels may be any integers (a numpy array, a list or a CPU tensor); the schemes work on the classes that
actually occur in ``labels``.
"""

from __future__ import annotations

import csv
import inspect
import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from fipa.errors import require

__all__ = [
    "PARTITIONERS",
    "balanced_dirichlet",
    "class_histogram",
    "dirichlet",
    "iid",
    "partition",
    "save_histogram",
    "shards",
]


# ----------------------------------------------------------------------------------------------- validation


def _labels(labels) -> np.ndarray:
    array = np.asarray(labels)
    require(
        array.ndim == 1 and array.size >= 1 and (np.issubdtype(array.dtype, np.integer) or array.dtype == bool),
        f"labels must be a non-empty 1-D integer array, got dtype {array.dtype} and shape {array.shape}",
    )
    return array.astype(np.int64, copy=False)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_clients(num_clients, n: int) -> int:
    require(
        _is_int(num_clients) and 1 <= num_clients <= n,
        f"partition.num_clients must be an integer in [1, {n}] (the number of samples), got {num_clients!r}",
    )
    return int(num_clients)


def _check_alpha(alpha) -> float:
    require(
        isinstance(alpha, Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and float(alpha) > 0,
        f"partition.alpha (Dirichlet concentration) must be a finite number > 0, got {alpha!r}",
    )
    return float(alpha)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. fipa.seeding.numpy_rng(seed, DATA)), got {type(rng).__name__}"
        )
    return rng


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ----------------------------------------------------------------------------------------------- schemes


def iid(labels, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniformly random split into parts whose sizes differ by at most one; every sample is used."""
    y = _labels(labels)
    num_clients = _check_clients(num_clients, len(y))
    _check_rng(rng)
    return _finish(np.array_split(rng.permutation(len(y)), num_clients))


def dirichlet(
    labels,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per-class Dirichlet label skew; client sizes vary; every sample is used.

    For each class c, the class's (shuffled) samples are cut among the clients in proportions
    p_c ~ Dir(alpha * 1_num_clients), at the points floor(cumsum(p_c) * n_c). This is the widespread
    "Dirichlet over clients per class" scheme usually cited as Hsu et al. 2019 (the code of Yurochkin et al.
    2019 / FedMA / NIID-Bench; without NIID-Bench's trick of zeroing the share of already-large clients).

    The whole draw is repeated until every client holds at least ``min_size`` samples. Only the client
    sizes decide acceptance and they depend on the proportions alone, so the proportions are resampled
    and the samples shuffled only once, after acceptance (same distribution as resampling everything).
    After ``max_tries`` rejected draws a ValueError is raised: with small alpha and many clients most
    clients get nothing, so use a larger alpha, fewer clients, a smaller min_size or balanced_dirichlet.
    """
    y = _labels(labels)
    num_clients = _check_clients(num_clients, len(y))
    alpha = _check_alpha(alpha)
    _check_rng(rng)
    require(
        _is_int(min_size) and 0 <= min_size and min_size * num_clients <= len(y),
        f"partition.min_size must be an integer in [0, N / num_clients] = [0, {len(y) // num_clients}], got {min_size!r}",
    )
    require(_is_int(max_tries) and max_tries >= 1, f"partition.max_tries must be an integer >= 1, got {max_tries!r}")

    classes, class_sizes = np.unique(y, return_counts=True)
    for _ in range(max_tries):
        props = rng.dirichlet(np.full(num_clients, alpha), size=len(classes))  # classes x clients
        cuts = (np.cumsum(props, axis=1)[:, :-1] * class_sizes[:, None]).astype(np.int64)
        bounds = np.concatenate([np.zeros((len(classes), 1), np.int64), cuts, class_sizes[:, None]], axis=1)
        if np.diff(bounds, axis=1).sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet partition: no draw in {max_tries} gave every one of the {num_clients} clients at least "
            f"{min_size} samples (alpha={alpha}, {len(y)} samples, {len(classes)} classes); raise partition.alpha, "
            f"lower partition.min_size or the number of clients, or use partition=balanced_dirichlet"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, row in zip(classes, bounds):
        members = rng.permutation(np.flatnonzero(y == c))
        for client, (lo, hi) in enumerate(zip(row[:-1], row[1:])):
            parts[client].append(members[lo:hi])
    return _finish([np.concatenate(p) for p in parts])


def _client_class_counts(q: np.ndarray, available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many images of each class one client takes in ``n`` sequential draws (see balanced_dirichlet).

    Sequential model: each draw picks class c with probability q[c] / sum(q over classes with images left)
    (uniform over the classes with images left if that sum is 0), then removes one image of c.

    Vectorized exactly: picking from q renormalized over the non-empty classes is rejection sampling from q
    (a draw landing on an empty class is discarded and repeated), so the sequential scheme equals "draw classes
    i.i.d. from p, discard every draw that finds its class already used up, stop at n kept draws". The first
    ``need`` draws of that stream are a multinomial(need, p); capping each class at what it has left keeps
    exactly the draws the stream would keep; the capped-off draws are re-drawn by continuing the stream, which
    (classes that are full reject everything) is the same as a fresh multinomial over p renormalized to the
    classes still open. Every round that caps a class empties it, so there are at most (#classes + 1) rounds.
    """
    available = available.copy()
    counts = np.zeros_like(available)
    need = n
    while need > 0:
        open_classes = available > 0
        weights = np.where(open_classes, q, 0.0)
        total = weights.sum()
        if not total > 0:  # every class with q > 0 is used up: fall back to the classes that remain
            weights, total = open_classes.astype(np.float64), float(open_classes.sum())
        drawn = np.minimum(rng.multinomial(need, weights / total), available)
        counts += drawn
        available -= drawn
        need -= int(drawn.sum())
    return counts


def balanced_dirichlet(labels, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """The paper's (FedRCL-style) balanced Dirichlet label skew: every client gets exactly floor(N / num_clients).

    Clients are filled one after another (client 0 first). Client m draws class proportions
    q_m ~ Dir(alpha * 1_K) over the K classes present and then takes floor(N / num_clients) images without
    replacement from what earlier clients left, one at a time: the class of each draw is chosen with
    probability proportional to q_m[class], renormalized over the classes that still have images (uniform
    over them if all classes with q_m > 0 are used up), and the image uniformly among that class's remaining
    images. The N mod num_clients samples left at the end are not used.

    Implementation: each class's indices are shuffled once into a queue; a client's per-class counts come
    from ``_client_class_counts`` (multinomial draws on the renormalized q, capped at what each class has
    left, the overflow re-drawn over the classes still open: exactly the law of the sequential draws, see
    there; a single uncapped multinomial would not be), and it then takes
    that many indices from the front of each queue. Taking the next k entries of a uniformly shuffled queue
    is the same as drawing k of the class's remaining images uniformly without replacement, so the result
    has exactly the distribution of the sequential scheme.
    """
    y = _labels(labels)
    num_clients = _check_clients(num_clients, len(y))
    alpha = _check_alpha(alpha)
    _check_rng(rng)

    classes, y_index = np.unique(y, return_inverse=True)
    queues = [rng.permutation(np.flatnonzero(y_index == k)) for k in range(len(classes))]
    available = np.array([len(q) for q in queues], dtype=np.int64)
    taken = np.zeros_like(available)
    per_client = len(y) // num_clients
    priors = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)
    parts = []
    for q in priors:
        counts = _client_class_counts(q, available, per_client, rng)
        parts.append(np.concatenate([queues[k][taken[k] : taken[k] + counts[k]] for k in np.flatnonzero(counts)]))
        taken += counts
        available -= counts
    return _finish(parts)


def shards(labels, num_clients: int, classes_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al. 2017): every client gets ``classes_per_client`` shards.

    Samples are sorted by label (random order within a class) and cut into num_clients * classes_per_client
    shards. Shards never straddle two classes: each class is cut into its own shards, their number
    proportional to the class size (largest remainder, at least one per class), so a client never sees
    more than classes_per_client classes. When there are fewer shards than classes, that is impossible:
    the sorted samples are then cut into equal contiguous pieces instead. Shards are dealt to clients at
    random, then duplicate classes within a client are removed by swapping shards between clients wherever
    a swap creates no new duplicate, so clients get distinct classes whenever the shard counts allow.
    Every sample is used; requires num_clients * classes_per_client <= N (no empty shard).
    """
    y = _labels(labels)
    num_clients = _check_clients(num_clients, len(y))
    _check_rng(rng)
    classes, y_index, sizes = np.unique(y, return_inverse=True, return_counts=True)
    k = classes_per_client
    require(
        _is_int(k) and 1 <= k <= len(classes),
        f"partition.classes_per_client must be an integer in [1, {len(classes)}] (the number of classes), got {k!r}",
    )
    k = int(k)
    total = num_clients * k
    require(
        total <= len(y),
        f"partition.classes_per_client * num_clients = {total} shards exceeds the {len(y)} samples; "
        "lower partition.classes_per_client or the number of clients",
    )

    # random order within each class, classes in label order
    order = np.lexsort((rng.random(len(y)), y_index))
    if total >= len(classes):
        per_class = _shards_per_class(sizes, total)
        pieces, piece_class = [], []
        start = 0
        for c, (size, count) in enumerate(zip(sizes, per_class)):
            for piece in np.array_split(order[start : start + size], count):
                pieces.append(piece)
                piece_class.append(c)
            start += size
    else:
        pieces = np.array_split(order, total)
        piece_class = [int(y_index[p[0]]) for p in pieces]  # the dominant class only matters for dealing
    deal = rng.permutation(total).reshape(num_clients, k)
    _remove_duplicate_classes(deal, np.asarray(piece_class), rng)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in deal])


def _shards_per_class(sizes: np.ndarray, total: int) -> np.ndarray:
    """Shard counts per class: >= 1 each, <= class size, summing to ``total``, close to proportional."""
    ideal = sizes / sizes.sum() * total
    counts = np.clip(np.floor(ideal).astype(np.int64), 1, sizes)
    while counts.sum() != total:
        if counts.sum() < total:
            room = counts < sizes
            gap = np.where(room, ideal - counts, -np.inf)
            counts[np.argmax(gap)] += 1
        else:
            room = counts > 1
            gap = np.where(room, counts - ideal, -np.inf)
            counts[np.argmax(gap)] -= 1
    return counts


def _remove_duplicate_classes(deal: np.ndarray, shard_class: np.ndarray, rng: np.random.Generator) -> None:
    """Swap shards between clients (in place) to remove repeated classes within a client where possible.

    Each accepted swap removes a duplicate and creates none, so this terminates.
    """
    num_clients, k = deal.shape
    if k == 1:
        return
    cls = shard_class[deal]  # clients x k, kept in sync with deal
    for i in range(num_clients):
        for slot in range(k):
            c = cls[i, slot]
            if not np.any(np.delete(cls[i], slot) == c):
                continue
            mine = set(np.delete(cls[i], slot).tolist())
            for j in rng.permutation(num_clients):
                if j == i:
                    continue
                swapped = False
                for t in range(k):
                    d = cls[j, t]
                    if d in mine or d == c:
                        continue
                    if c in set(np.delete(cls[j], t).tolist()):
                        continue
                    deal[i, slot], deal[j, t] = deal[j, t], deal[i, slot]
                    cls[i, slot], cls[j, t] = d, c
                    swapped = True
                    break
                if swapped:
                    break


# ----------------------------------------------------------------------------------------------- registry

PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "balanced_dirichlet": balanced_dirichlet,
    "shards": shards,
}


def partition(name: str, labels, num_clients: int, rng: np.random.Generator, **kwargs) -> list[np.ndarray]:
    """Dispatch by name, e.g. ``partition("balanced_dirichlet", y, 100, rng, alpha=0.05)``."""
    require(
        isinstance(name, str) and name in PARTITIONERS,
        f"partition.name must be one of {', '.join(PARTITIONERS)}; got {name!r}",
    )
    fn = PARTITIONERS[name]
    params = inspect.signature(fn).parameters
    options = [p for p in params if p not in ("labels", "num_clients", "rng")]
    unknown = sorted(set(kwargs) - set(options))
    require(
        not unknown,
        f"partition {name!r} takes the options {', '.join(options) or '(none)'}; unknown: {', '.join(unknown)}",
    )
    missing = [p for p in options if params[p].default is inspect.Parameter.empty and p not in kwargs]
    require(not missing, f"partition {name!r} needs partition.{', partition.'.join(missing)}")
    return fn(labels, num_clients, rng=rng, **kwargs)


# ----------------------------------------------------------------------------------------------- inspection


def class_histogram(labels, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts per client and class: an int64 array of shape (len(parts), num_classes)."""
    y = _labels(labels)
    require(_is_int(num_classes) and num_classes >= 1, f"num_classes must be an integer >= 1, got {num_classes!r}")
    require(
        y.min() >= 0 and y.max() < num_classes,
        f"labels must lie in [0, {num_classes}), found [{y.min()}, {y.max()}]",
    )
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in zip(hist, parts):
        row += np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist


def save_histogram(hist: np.ndarray, path_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<prefix>.csv`` (one row per client) and ``<prefix>.png`` (stacked bars, or a heatmap beyond
    20 classes). Returns both paths. Uses matplotlib's Agg canvas directly: no pyplot, no global backend."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = np.asarray(hist)
    require(hist.ndim == 2, f"hist must be a clients x classes array, got shape {hist.shape}")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = Path(f"{prefix}.csv"), Path(f"{prefix}.png")
    num_clients, num_classes = hist.shape

    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["client", *(f"class_{c}" for c in range(num_classes)), "total"])
        for client, row in enumerate(hist):
            writer.writerow([client, *row.tolist(), int(row.sum())])

    fig = Figure(figsize=(min(max(6.0, 0.12 * num_clients + 2), 24), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clients = np.arange(num_clients)
    if num_classes <= 20:
        colors = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors  # type: ignore[attr-defined]
        bottom = np.zeros(num_clients)
        for c in range(num_classes):
            ax.bar(clients, hist[:, c], bottom=bottom, width=0.9, color=colors[c], label=str(c), linewidth=0)
            bottom += hist[:, c]
        ax.set_ylabel("samples")
        ax.legend(
            title="class", fontsize="small", ncol=1 + num_classes // 10, bbox_to_anchor=(1.01, 1), loc="upper left"
        )
    else:
        image = ax.imshow(hist.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        fig.colorbar(image, ax=ax, label="samples")
        ax.set_ylabel("class")
    ax.set_xlabel("client")
    ax.set_title(f"label distribution over {num_clients} clients")
    fig.tight_layout()
    fig.savefig(png_path)
    return csv_path, png_path
