"""The token/row reservoir (capture/reservoir.py): slot storage equals the plain definition."""

from __future__ import annotations

import numpy as np
import torch

from attn_audit.capture.reservoir import Reservoir, priorities


def test_reservoir_keeps_the_smallest_priorities_in_insertion_order() -> None:
    """After each batch, every key's items are the candidates of smallest priority so far, in
    insertion order (older batches first): what concatenating all candidates and keeping those
    in order gives, for batches that fill, overflow and barely touch the reservoir."""
    gen = torch.Generator().manual_seed(0)
    res = Reservoir(50)
    seen_prio: list[np.ndarray] = []
    seen: dict = {0: [], (1, "q"): []}  # the keys an audit uses: a layer; (layer, site)
    for batch, size in enumerate([30, 30, 5, 80, 1, 40]):
        pos = np.arange(size)
        prio = priorities(7, np.full(size, batch), pos)
        res.plan(prio, np.stack([np.full(size, batch), pos], 1))
        for key, width in ((0, 3), ((1, "q"), 5)):
            cand = torch.randn(size, width, generator=gen)
            res.update(key, cand)
            seen[key].append(cand)
        seen_prio.append(prio)
        allp = np.concatenate(seen_prio)
        keep = np.sort(np.argsort(allp, kind="stable")[:50])
        data = res.data
        for key in seen:
            torch.testing.assert_close(data[key], torch.cat(seen[key])[torch.from_numpy(keep)], rtol=0, atol=0)
        np.testing.assert_array_equal(res.prio, allp[keep])
    assert len(res.prio) == 50
    # a restored state reads back the same items
    other = Reservoir(50)
    other.load_state("t", res.to_state("t"))
    for key in seen:
        torch.testing.assert_close(other.data[key], res.data[key], rtol=0, atol=0)
