"""Bounded, mergeable samples of tokens and rows (the reservoirs of :mod:`attn_audit.capture.accumulate`).

A reservoir keeps the items with the smallest seeded hash priority of (sequence index,
position). That rule is deterministic, independent of batching and mergeable across
processes: the union of two reservoirs cut to the smallest priorities is the reservoir of the
union. Items are CPU float32 tensors, one buffer of ``capacity`` rows per key (layer, site).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def priorities(seed: int, seq_index: np.ndarray, pos: np.ndarray, salt: int = 0) -> np.ndarray:
    """Seeded hash (splitmix64) of (seq, pos) as floats in [0, 1); shapes broadcast."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed & _MASK64) * np.uint64(0x9E3779B97F4A7C15)
            + seq_index.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            + pos.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            + np.uint64(salt)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Reservoir:
    """Bounded priority sample shared by all layers: the same items are kept for every layer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prio = np.zeros(0)
        self.ids = np.zeros((0, 2), dtype=np.int64)  # (sequence index, position)
        self.data: dict[Any, torch.Tensor] = {}  # views of the first len(prio) rows of _bufs
        self._bufs: dict[Any, torch.Tensor] = {}
        self._keep: torch.Tensor | None = None

    def _store(self, key: Any, t: torch.Tensor) -> None:
        """Keep ``t`` in a buffer of ``capacity`` rows, allocated (and touched) once, so memory
        is the same after 16 sequences as after 512."""
        buf = self._bufs.get(key)
        if buf is None or buf.shape[1:] != t.shape[1:] or buf.dtype != t.dtype:
            buf = self._bufs[key] = torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype).fill_(0)
        buf[: t.shape[0]] = t
        self.data[key] = buf[: t.shape[0]]

    def plan(self, prio: np.ndarray, ids: np.ndarray) -> None:
        """Decide which old and new items survive this batch (call before the layers report)."""
        allp = np.concatenate([self.prio, prio])
        order = np.argsort(allp, kind="stable")[: self.capacity]
        order.sort()
        self._keep = torch.from_numpy(order)
        self.prio = allp[order]
        self.ids = np.concatenate([self.ids, ids])[order]

    def merge(self, prio: np.ndarray, ids: np.ndarray, data: dict[Any, torch.Tensor]) -> None:
        """Union with another reservoir, keeping the smallest priorities, ordered by (seq, pos)."""
        allp = np.concatenate([self.prio, prio])
        allids = np.concatenate([self.ids, ids])
        keep = np.argsort(allp, kind="stable")[: self.capacity]
        keep = keep[np.lexsort((allids[keep, 1], allids[keep, 0]))]
        for key in set(self.data) | set(data):
            like = self.data.get(key, data.get(key))
            assert like is not None
            mine = self.data.get(key, like.new_zeros((len(self.prio), *like.shape[1:])))
            theirs = data.get(key, like.new_zeros((len(prio), *like.shape[1:])))
            self._store(key, torch.cat([mine, theirs])[torch.from_numpy(keep)])
        self.prio = allp[keep]
        self.ids = allids[keep]

    def update(self, key: Any, new: torch.Tensor) -> None:
        """Merge ``new`` (n_new, ...) candidates of one layer/site into the sample."""
        assert self._keep is not None
        new = new.detach().to("cpu", torch.float32)
        old = self.data.get(key)
        both = new if old is None else torch.cat([old, new])
        self._store(key, both[self._keep])

    def to_state(self, tag: str) -> dict[str, np.ndarray]:
        """The sample as plain arrays under ``tag.`` (see :meth:`Accumulator.state`)."""
        st: dict[str, np.ndarray] = {f"{tag}.prio": self.prio, f"{tag}.ids": self.ids}
        for key, t in self.data.items():
            st[f"{tag}.data.{_key_str(key)}"] = t.numpy()
        return st

    def load_state(self, tag: str, st: dict[str, np.ndarray]) -> None:
        """Restore :meth:`to_state`."""
        self.prio = np.array(st[f"{tag}.prio"])
        self.ids = np.array(st[f"{tag}.ids"])
        prefix = f"{tag}.data."
        self.data = {}
        for k, v in st.items():
            if k.startswith(prefix):
                self._store(_key_parse(k[len(prefix):]), torch.from_numpy(np.array(v)))

    def merge_state(self, tag: str, st: dict[str, np.ndarray]) -> None:
        """Fold another process's :meth:`to_state` into this sample (see :meth:`merge`)."""
        prefix = f"{tag}.data."
        data = {_key_parse(k[len(prefix):]): torch.from_numpy(np.array(v))
                for k, v in st.items() if k.startswith(prefix)}
        self.merge(np.array(st[f"{tag}.prio"]), np.array(st[f"{tag}.ids"]), data)


def _key_str(key: Any) -> str:
    return f"{key[0]}:{key[1]}" if isinstance(key, tuple) else str(key)


def _key_parse(text: str) -> Any:
    if ":" in text:
        layer, site = text.split(":", 1)
        return (int(layer), site)
    return int(text)
