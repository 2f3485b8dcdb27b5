"""The finite-n Monte Carlo grid cells on disk, so that every run after the first reuses them.

Pure numpy (no torch). :mod:`attn_audit.theory.finite_n` caches the median k / n of each
(n, eps) cell at the sigma codes it needed, keyed by (n, eps, draws, seed, sigma_step). Those
values are a deterministic function of the key and of the simulation code, so they are stored
as they are (float64, bit for bit) in one ``.npz`` per (draws, seed, step) under the user cache
(``$ATTN_AUDIT_CACHE``, else ``$XDG_CACHE_HOME/attn-audit``, else ``~/.cache/attn-audit``), in a
folder named after a hash of the simulation sources and the numpy version: a change to either
starts a new store. ``ATTN_AUDIT_NO_DISK_CACHE=1`` turns the store off. A store that cannot be
read or written is ignored (the cells are then simulated, as without it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# (draws, seed, step) stores already merged into the process cache
_LOADED: set[tuple[int, int, float]] = set()
# Stores larger than this many cells are not written (the process cache is bounded alike).
_MAX_CELLS = 20_000


def _folder() -> Path | None:
    if os.environ.get("ATTN_AUDIT_NO_DISK_CACHE") == "1":
        return None
    from attn_audit.load import cache_root  # no torch at import

    here = Path(__file__).resolve().parent
    h = hashlib.sha256(np.__version__.encode())
    for name in ("simulation.py", "finite_n.py", "kappa_store.py"):
        h.update((here / name).read_bytes())
    return cache_root() / "finite_n" / h.hexdigest()[:16]


def _path(draws: int, seed: int, step: float) -> Path | None:
    folder = _folder()
    return None if folder is None else folder / f"kappa-d{draws}-s{seed}-st{step!r}.npz"


def load_into(cache: dict[Any, Any], draws: int, seed: int, step: float) -> None:
    """Merge the stored cells of (draws, seed, step) into ``cache`` (once per process).

    ``cache`` maps (n, eps, draws, seed, step) to (sorted sigma codes, kappa), as in
    :data:`attn_audit.theory.finite_n._KAPPA_CACHE`; cells already there are kept.
    """
    key = (draws, seed, step)
    if key in _LOADED:
        return
    _LOADED.add(key)
    _read(_path(draws, seed, step), cache, draws, seed, step)


def _read(path: Path | None, cache: dict[Any, Any], draws: int, seed: int, step: float) -> None:
    """Add the cells stored at ``path`` that ``cache`` lacks (nothing when unreadable)."""
    if path is None or not path.exists():
        return
    try:
        with np.load(path) as z:
            n, eps, start = z["n"], z["eps"], z["start"]
            codes, values = z["codes"], z["values"]
    except (OSError, ValueError, KeyError):
        return
    for i in range(n.size):
        tkey = (int(n[i]), float(eps[i]), draws, seed, step)
        if tkey not in cache:
            cache[tkey] = (codes[start[i] : start[i + 1]].copy(), values[start[i] : start[i + 1]].copy())


def save_from(cache: dict[Any, Any], draws: int, seed: int, step: float) -> None:
    """Write the cells of (draws, seed, step) in ``cache`` to the store (atomically: a temporary
    file, then a rename; a concurrent run's write may win, which only costs a later simulation)."""
    path = _path(draws, seed, step)
    mine = {k: v for k, v in cache.items() if k[2:] == (draws, seed, step)}
    _read(path, mine, draws, seed, step)  # keep what the store holds beyond this process's cells
    cells = sorted(mine.items(), key=lambda kv: kv[0])
    if path is None or not cells or len(cells) > _MAX_CELLS:
        return
    sizes = np.array([v[0].size for _, v in cells], dtype=np.int64)
    arrays = {
        "n": np.array([k[0] for k, _ in cells], dtype=np.int64),
        "eps": np.array([k[1] for k, _ in cells], dtype=np.float64),
        "start": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "codes": np.concatenate([v[0] for _, v in cells]).astype(np.int64),
        "values": np.concatenate([v[1] for _, v in cells]).astype(np.float64),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError:
        return
