"""Running totals of the kernel patterns' coverage (:mod:`attn_audit.rows.patterns`) for one
sequence length: per layer, head and pattern, the histogram of the level each valid row needs for
``1 − eps`` and the summed kept mass at every level. Fixed size, checkpointed and merged as plain
numpy arrays (counts and sums add), like :class:`attn_audit.capture.totals.RowTotals`.
"""

from __future__ import annotations

import numpy as np
import torch

from attn_audit.config import MeasureSpec
from attn_audit.rows.patterns import PatternRows, num_blocks


class PatternTotals:
    """``need_hist[name]`` int64 (L, H, E, nb + 2) and ``kept_sum[name]`` float64 (L, H, nb + 1)."""

    def __init__(self, num_layers: int, num_heads: int, seq_len: int, spec: MeasureSpec) -> None:
        self.spec = spec
        self.nb = num_blocks(seq_len, spec.block_size)
        L, H, E, nb = num_layers, num_heads, len(spec.eps), self.nb
        self.need_hist = {p: np.zeros((L, H, E, nb + 2), dtype=np.int64) for p in spec.patterns}
        self.kept_sum = {p: np.zeros((L, H, nb + 1)) for p in spec.patterns}
        self.rows = np.zeros((L, H), dtype=np.int64)

    def fold(self, layer: int, pr: PatternRows, valid: torch.Tensor) -> None:
        """Add the pattern rows ``pr`` (fields (batch·head, R, ...)) of the valid rows ``valid``
        (bool (batch, head, R); a layer with fewer heads than the largest fills the first ones)."""
        b, h, r = valid.shape
        v = valid.reshape(b * h, r).cpu().numpy()
        self.rows[layer, :h] += v.reshape(b, h, r).sum(axis=(0, 2))
        vd = v.astype(np.float64)
        e = len(self.spec.eps)
        # one bin per (head, eps, level): flat index of every row's need, valid rows only
        base = ((np.arange(h)[:, None] * e + np.arange(e)[None, :]) * (self.nb + 2))  # (h, E)
        base = np.broadcast_to(base[None, :, None, :], (b, h, r, e)).reshape(b * h, r, e)[v]
        for name, curve_t in pr.kept.items():
            curve = curve_t.cpu().numpy()  # (G, R, nbp)
            nbp = curve.shape[-1]
            kept = np.einsum("grl,gr->gl", curve, vd).reshape(b, h, nbp).sum(axis=0)
            self.kept_sum[name][layer, :h, :nbp] += kept
            need = np.minimum(pr.need[name].cpu().numpy()[v], self.nb + 1)  # (valid rows, E)
            self.need_hist[name][layer, :h] += np.bincount(
                (base + need).ravel(), minlength=h * e * (self.nb + 2)).reshape(h, e, self.nb + 2)

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        st: dict[str, np.ndarray] = {"patterns.rows": self.rows}
        for name in self.spec.patterns:
            st[f"patterns.need.{name}"] = self.need_hist[name]
            st[f"patterns.kept.{name}"] = self.kept_sum[name]
        return st

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        self.rows[...] = st["patterns.rows"]
        for name in self.spec.patterns:
            self.need_hist[name][...] = st[f"patterns.need.{name}"]
            self.kept_sum[name][...] = st[f"patterns.kept.{name}"]

    def merge_state(self, other: dict[str, np.ndarray]) -> None:
        self.rows += other["patterns.rows"]
        for name in self.spec.patterns:
            self.need_hist[name] += other[f"patterns.need.{name}"]
            self.kept_sum[name] += other[f"patterns.kept.{name}"]

    def summary(self) -> dict[str, object]:
        """Plain numpy totals for :mod:`attn_audit.assemble.patterns`."""
        return {"block_size": self.spec.block_size, "nb": self.nb, "rows": self.rows.copy(),
                "need_hist": {k: v.copy() for k, v in self.need_hist.items()},
                "kept_sum": {k: v.copy() for k, v in self.kept_sum.items()}}
