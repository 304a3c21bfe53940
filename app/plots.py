"""Matplotlib figures of what HMT remembers: recall weights, recall distances, memory PCA.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: pyplot keeps global
state that is not safe across the server's worker threads, and needs no GUI backend this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

ACCENT = "#e8590c"  # evidence segments and the question's query point
MUTED = "#adb5bd"


def _figure(width: float = 6.4, height: float = 3.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def message_figure(message: str, width: float = 6.4, height: float = 3.0) -> Figure:
    """A blank figure that says why there is nothing to plot yet."""
    fig, ax = _figure(width, height)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, color="#495057", fontsize=11)
    return fig


def recall_weights_figure(
    n_segments: int, recall: Sequence[tuple[int, float]], evidence: Sequence[int] = ()
) -> Figure:
    """Bar plot of the recall weight of every segment position; evidence segments highlighted."""
    fig, ax = _figure()
    weights = np.zeros(max(n_segments, 1))
    for seg, w in recall:
        if 0 <= seg < len(weights):
            weights[seg] = w
    chosen = set(evidence)
    colors = [ACCENT if i in chosen else MUTED for i in range(len(weights))]
    ax.bar(np.arange(len(weights)), weights, color=colors, width=0.9 if len(weights) > 1 else 0.5)
    ax.set_xlabel("segment position in the document")
    ax.set_ylabel("recall weight")
    ax.set_title("Which segments the question recalls (orange: evidence)", fontsize=10)
    ax.set_xlim(-0.7, len(weights) - 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.1)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def recall_distance_figure(n_segments: int, recall: Sequence[tuple[int, float]]) -> Figure:
    """Histogram of how far back the question reaches (paper fig. 11).

    The question is read as segment number ``n_segments``; a recalled segment ``i`` lies
    ``n_segments - i`` segments back. Each recalled segment counts with its recall weight.
    """
    fig, ax = _figure()
    if not recall:
        ax.axis("off")
        return fig
    distances = np.array([n_segments - seg for seg, _ in recall], dtype=float)
    weights = np.array([w for _, w in recall], dtype=float)
    top = max(int(distances.max()), 1)
    bins = np.arange(0.5, top + 1.5, max(1, int(np.ceil(top / 40))))  # at most ~40 bars
    ax.hist(distances, bins=bins, weights=weights, color="#1c7ed6", edgecolor="white")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("recall distance (segments back from the question)")
    ax.set_ylabel("total recall weight")
    ax.set_title("How far back the question reaches", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _pca(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D PCA: (projected points, mean, components (2, d)); fewer than 2 components are zero-padded."""
    x = points.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    if len(x) > 1 and np.abs(centred).max() > 0:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        # Directions with no variance (e.g. the second of two points) are numerical noise: drop them.
        vt = vt[singular > 1e-6 * singular[0]]
    else:
        vt = np.zeros((0, x.shape[1]))
    components = np.zeros((2, x.shape[1]))
    components[: min(2, len(vt))] = vt[:2]
    return centred @ components.T, mean, components


def memory_pca_figure(memory: np.ndarray, recall_key: np.ndarray, query: np.ndarray | None = None) -> Figure:
    """Two PCA panels coloured by segment position: memory embeddings M_n, and recall keys K_n.

    The question's recall query lives in the recall-key space, so it is projected with the keys' PCA;
    keys near it (large ``q . K_n``) are the ones recall weighs most.
    """
    fig = Figure(figsize=(9.6, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    positions = np.arange(len(memory))
    scatter = None
    for ax, data, title in (
        (axes[0], memory, "memory embeddings $M_n$ (PCA)"),
        (axes[1], recall_key, "recall keys $K_n$ (PCA)"),
    ):
        xy, mean, comps = _pca(data)
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=positions, cmap="viridis", s=28, edgecolors="none")
        if len(xy) <= 30:
            for i, (x, y) in enumerate(xy):
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", color="#495057")
        if data is recall_key and query is not None:
            q = (np.asarray(query, dtype=np.float64) - mean) @ comps.T
            ax.scatter([q[0]], [q[1]], marker="*", s=260, color=ACCENT, edgecolors="black", linewidths=0.6,
                       label="question's recall query $q$", zorder=5)
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.spines[["top", "right"]].set_visible(False)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, label="segment position", shrink=0.85)
    return fig
