"""float64 NumPy references of the lazy rules for embedding tables, written from their sources
(docs/optimizers.md cites them): a push is (ids, values); rows named twice are summed first, and
only the rows named change, parameters and state alike."""

from __future__ import annotations

import numpy as np


def segment_sum(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids and each one's summed rows."""
    uniq, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
    out = np.zeros((len(uniq), *values.shape[1:]))
    np.add.at(out, inverse, np.asarray(values, np.float64))
    return uniq, out


class LazyAdam:
    """TF Addons LazyAdam (`_resource_apply_sparse`): lr_t = lr·√(1−b2ᵗ)/(1−b1ᵗ), t the global step."""

    def __init__(self, table: np.ndarray, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.p = table.astype(np.float64)
        self.m, self.v = np.zeros_like(self.p), np.zeros_like(self.p)
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0

    def push(self, ids, values) -> None:
        self.t += 1
        r, g = segment_sum(ids, values)
        self.m[r] = self.b1 * self.m[r] + (1 - self.b1) * g
        self.v[r] = self.b2 * self.v[r] + (1 - self.b2) * g * g
        lr_t = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.p[r] -= lr_t * self.m[r] / (np.sqrt(self.v[r]) + self.eps)


class RowwiseAdagrad:
    """FBGEMM EXACT_ROWWISE_ADAGRAD: a_r += mean(g_r²); p_r -= lr·g_r/(√a_r + eps)."""

    def __init__(self, table: np.ndarray, lr: float, eps: float = 1e-8, a0: float = 0.0):
        self.p = table.astype(np.float64)
        self.a = np.full(self.p.shape[0], a0)
        self.lr, self.eps = lr, eps

    def push(self, ids, values) -> None:
        r, g = segment_sum(ids, values)
        self.a[r] += np.mean(g.reshape(len(r), int(np.prod(g.shape[1:]))) ** 2, axis=1)
        self.p[r] -= self.lr * g / (np.sqrt(self.a[r]) + self.eps).reshape(-1, *([1] * (g.ndim - 1)))


class SparseSgd:
    """MXNet sgd_mom_update(lazy_update=True) in optax's form: τ_r = g_r + μ·τ_r; p_r -= lr·τ_r."""

    def __init__(self, table: np.ndarray, lr: float, momentum: float = 0.0):
        self.p = table.astype(np.float64)
        self.trace = np.zeros_like(self.p)
        self.lr, self.mu = lr, momentum

    def push(self, ids, values) -> None:
        r, g = segment_sum(ids, values)
        self.trace[r] = g + self.mu * self.trace[r]
        self.p[r] -= self.lr * self.trace[r]
