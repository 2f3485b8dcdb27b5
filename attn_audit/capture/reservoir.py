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
    """Bounded priority sample shared by all layers: the same items are kept for every layer.

    The items' order is their insertion order (older batches first, a batch in its own order).
    Each key's buffer holds ``capacity`` rows in slots: a batch writes only its surviving new
    items, into the slots of the evicted ones, and :attr:`data` gathers the slots in item order
    when read (once, at the end of a length), instead of re-copying the whole sample per layer
    call.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prio = np.zeros(0)
        self.ids = np.zeros((0, 2), dtype=np.int64)  # (sequence index, position)
        self._slot = np.zeros(0, dtype=np.int64)  # item i lives in row _slot[i] of every buffer
        self._bufs: dict[Any, torch.Tensor] = {}
        self._new_rows: torch.Tensor | None = None  # this batch's surviving candidates ...
        self._new_slots: torch.Tensor | None = None  # ... and the slots they go to

    @property
    def data(self) -> dict[Any, torch.Tensor]:
        """Per key, the items in order: (n_items, ...) float32 CPU tensors."""
        slot = torch.from_numpy(self._slot)
        return {key: buf[slot] for key, buf in self._bufs.items()}

    def _buffer(self, key: Any, like: torch.Tensor) -> torch.Tensor:
        """The key's buffer of ``capacity`` rows, allocated (and touched) once, so memory is the
        same after 16 sequences as after 512."""
        buf = self._bufs.get(key)
        if buf is None or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = self._bufs[key] = torch.empty((self.capacity, *like.shape[1:]), dtype=like.dtype).fill_(0)
        return buf

    def _store(self, key: Any, t: torch.Tensor) -> None:
        """Set the key's items to ``t`` (n_items, ...), in order, in slots 0..n_items-1."""
        self._buffer(key, t)[: t.shape[0]] = t

    def plan(self, prio: np.ndarray, ids: np.ndarray) -> None:
        """Decide which old and new items survive this batch (call before the layers report)."""
        n_old = len(self.prio)
        allp = np.concatenate([self.prio, prio])
        order = np.argsort(allp, kind="stable")[: self.capacity]
        order.sort()
        old_kept = order[order < n_old]
        new_kept = order[order >= n_old] - n_old
        used = np.zeros(self.capacity, dtype=bool)
        used[self._slot[old_kept]] = True
        free = np.flatnonzero(~used)[: len(new_kept)]  # evicted items' slots, then unused ones
        self._slot = np.concatenate([self._slot[old_kept], free])
        self._new_rows = torch.from_numpy(new_kept)
        self._new_slots = torch.from_numpy(free)
        self.prio = allp[order]
        self.ids = np.concatenate([self.ids, ids])[order]

    def merge(self, prio: np.ndarray, ids: np.ndarray, data: dict[Any, torch.Tensor]) -> None:
        """Union with another reservoir, keeping the smallest priorities, ordered by (seq, pos)."""
        allp = np.concatenate([self.prio, prio])
        allids = np.concatenate([self.ids, ids])
        keep = np.argsort(allp, kind="stable")[: self.capacity]
        keep = keep[np.lexsort((allids[keep, 1], allids[keep, 0]))]
        mine_all = self.data
        for key in set(mine_all) | set(data):
            like = mine_all.get(key, data.get(key))
            assert like is not None
            mine = mine_all.get(key, like.new_zeros((len(self.prio), *like.shape[1:])))
            theirs = data.get(key, like.new_zeros((len(prio), *like.shape[1:])))
            self._store(key, torch.cat([mine, theirs])[torch.from_numpy(keep)])
        self.prio = allp[keep]
        self.ids = allids[keep]
        self._slot = np.arange(len(keep), dtype=np.int64)

    def update(self, key: Any, new: torch.Tensor) -> None:
        """Merge ``new`` (n_new, ...) candidates of one layer/site into the sample."""
        assert self._new_rows is not None and self._new_slots is not None
        kept = new.detach()[self._new_rows.to(new.device)].to("cpu", torch.float32)
        self._buffer(key, kept)[self._new_slots] = kept

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
        self._bufs = {}
        self._slot = np.arange(len(self.prio), dtype=np.int64)
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
