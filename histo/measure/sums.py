"""Per-object sums collected block by block and reduced at the end (private to the package)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Sums", "label_boxes", "per_label"]


@dataclass
class Sums:
    """Per-label partial sums collected over blocks, reduced at the end."""

    names: tuple[str, ...]
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=list)

    def add(self, labels: np.ndarray, **values: np.ndarray) -> None:
        if labels.size:
            self.parts.append((labels.astype(np.int64), values))

    def reduce(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(labels with a positive area, sorted; the sums of each of them)."""
        if not self.parts:
            ids = np.zeros(0, np.int64)
        else:
            ids = np.unique(np.concatenate([labels for labels, _ in self.parts]))
        out = {name: np.zeros(ids.size) for name in self.names}
        for labels, values in self.parts:
            pos = np.searchsorted(ids, labels)
            ok = (pos < ids.size) & (ids[np.minimum(pos, ids.size - 1)] == labels)
            for name, v in values.items():
                out[name] += np.bincount(pos[ok], weights=v[ok], minlength=ids.size)
        keep = out["area"] > 0
        return ids[keep], {k: v[keep] for k, v in out.items()}


def per_label(
    labels: np.ndarray,
    weights: dict[str, np.ndarray],
    count: str | None = None,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Sum ``weights`` per distinct value of ``labels`` (1-D): (unique labels, sums).

    ``count`` names an extra sum: the number of pixels of each label. With ``ids``, ``labels``
    are indices 1..n into ``ids`` (compact labels) and the labels returned are ``ids`` values.
    Each sum adds the values in the order of ``labels`` (``np.bincount``), whatever the path.
    """
    if labels.size == 0:
        names = [*weights, *([count] if count else [])]
        return np.zeros(0, np.int64), {k: np.zeros(0) for k in names}
    labels = labels.astype(np.int64, copy=False)
    top = int(labels.max())
    if ids is not None or top <= 4 * labels.size + 65536:
        # labels small enough to index a bincount directly
        n = np.bincount(labels, minlength=top + 1)
        present = np.flatnonzero(n)
        out = {
            k: np.bincount(labels, weights=v, minlength=top + 1)[present]
            for k, v in weights.items()
        }
        if count:
            out[count] = n[present].astype(float)
        u = present.astype(np.int64) if ids is None else ids[present - 1]
        return u, out
    u, inv = np.unique(labels, return_inverse=True)
    out = {k: np.bincount(inv, weights=v, minlength=u.size) for k, v in weights.items()}
    if count:
        out[count] = np.bincount(inv, minlength=u.size).astype(float)
    return u, out


def label_boxes(
    vals: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (n, 4) boxes y0 x0 y1 x1) of the pixels (rows, cols) of each label of ``vals``."""
    order = np.argsort(vals, kind="stable")
    v = vals[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    r, c = rows[order], cols[order]
    box = np.stack(
        [
            np.minimum.reduceat(r, starts),
            np.minimum.reduceat(c, starts),
            np.maximum.reduceat(r, starts) + 1,
            np.maximum.reduceat(c, starts) + 1,
        ],
        axis=1,
    )
    return v[starts].astype(np.int64), box
