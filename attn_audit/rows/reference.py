"""The brute-force float64 definition of the per-row metrics (docs/methods.md §2):
softmax, a full sort, a cumulative sum. :func:`reference_row_metrics` is what the kernels of
:mod:`attn_audit.rows.dispatch` must match (the integers exactly); :func:`_exact_sorted` also decides the
rows those kernels flag inside their rounding margin.
"""

from __future__ import annotations

import torch

from attn_audit.config import MeasureSpec
from attn_audit.rows.spec import RowMetrics, _check_inputs, _flat_qpos

__all__ = ["reference_row_metrics"]


def _finish_regions(
    reg: dict[str, torch.Tensor],
    z: torch.Tensor,
    n_i: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    c: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Masses and bulk statistics from region sums (all float64 (r,)).

    z: total mass sum exp(s - max); n_i: allowed count; s1 / s2: sums of (s - c) and
    (s - c)^2 over all allowed keys (float64, with c the row max); reg: :func:`_region_stats`
    with the same c.
    """
    sink = reg["m_s"] / z
    local = reg["m_l"] / z
    bulk = ((z - reg["m_s"] - reg["m_l"]) / z).clamp_min(0.0)
    n_b = n_i - reg["n_s"] - reg["n_l"]
    sd = s1 - reg["d_s"] - reg["d_l"]
    sdd = s2 - reg["dd_s"] - reg["dd_l"]
    nb_safe = n_b.clamp_min(1.0)
    mean_c = sd / nb_safe
    var = (sdd / nb_safe - mean_c * mean_c).clamp_min(0.0)
    ok = n_b >= 2
    nan = torch.full_like(mean_c, float("nan"))
    return {
        "sink_mass": sink,
        "local_mass": local,
        "bulk_mass": bulk,
        "bulk_mean": torch.where(ok, c + mean_c, nan),
        "bulk_std": torch.where(ok, var.sqrt(), nan),
        "n_bulk": n_b,
    }


def _exact_sorted(
    x: torch.Tensor, spec: MeasureSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute-force float64 core shared by the reference and the fallback path.

    x: (K, n) float scores, ``-inf`` = masked.
    Returns p (K, n) float64 probabilities (0 on masked keys and on empty rows),
    n_i (K,) int64, k_eps (K, E) int64, k_eps_sinks (K, E) int64, tail (K, B) float64.

    Definitions: p = softmax(x.double()); C = cumsum(sort(p, descending)) (float64);
    k_eps = min(1 + #{k : C_k < 1 - eps}, n_i).  With sinks S (allowed keys < spec.sinks),
    m_S = sum_{j in S} p_j, C' = cumsum of the sorted non-sink probabilities and
    P_0 = m_S, P_k = m_S + C'_k: k_eps_sinks = |S| + min(#{k >= 0 : P_k < 1 - eps}, n_ns).
    tail_b = max(1 - C_{min(b, n_i)}, 0) (NaN for empty rows).
    """
    k_rows, n = x.shape
    dev = x.device
    allowed = x > float("-inf")
    n_i = allowed.sum(1)
    p = torch.softmax(x.to(torch.float64), dim=-1)
    p = torch.where(allowed, p, 0.0)  # rows with no allowed key: NaN -> 0
    eps = torch.tensor(spec.eps, dtype=torch.float64, device=dev)
    thr = (1.0 - eps).expand(k_rows, -1).contiguous()  # (K, E)

    c = torch.sort(p, dim=1, descending=True).values.cumsum(1)
    k = torch.searchsorted(c, thr, side="left") + 1
    k = torch.minimum(k, n_i[:, None])

    s0 = min(spec.sinks, n)
    sink_col = torch.arange(n, device=dev) < s0
    ps = torch.where(sink_col[None, :], 0.0, p)
    n_s = allowed[:, :s0].sum(1)
    n_ns = n_i - n_s
    m_s = p[:, :s0].sum(1)
    cns = torch.sort(ps, dim=1, descending=True).values.cumsum(1)
    pk = torch.cat([m_s[:, None], m_s[:, None] + cns], dim=1)  # (K, n+1), non-decreasing
    kns = torch.searchsorted(pk, thr, side="left")
    kns = torch.minimum(kns, n_ns[:, None])
    ks = n_s[:, None] + kns

    if spec.budgets:
        bud = torch.tensor(spec.budgets, dtype=torch.int64, device=dev)
        bi = torch.minimum(bud[None, :], n_i[:, None])  # (K, B)
        top = torch.gather(c, 1, (bi - 1).clamp_min(0))
        tail = (1.0 - top).clamp_min(0.0)
        tail = torch.where(n_i[:, None] > 0, tail, float("nan"))
    else:
        tail = torch.empty((k_rows, 0), dtype=torch.float64, device=dev)
    empty = n_i == 0
    k = torch.where(empty[:, None], 0, k)
    ks = torch.where(empty[:, None], 0, ks)
    return p, n_i, k, ks, tail


# ---------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def reference_row_metrics(
    scores: torch.Tensor, q_pos: torch.Tensor, spec: MeasureSpec
) -> RowMetrics:
    """Brute-force float64 reference: softmax in float64, full descending sort, cumsum, search.

    scores: float (G, R, n) pre-softmax logits, ``-inf`` on disallowed keys.
    q_pos: int64 (R,) query positions (local window only).
    Returns a :class:`RowMetrics` with fields of leading shape (G, R). Used by the tests.
    """
    g, r, n = _check_inputs(scores, q_pos)
    x = scores.reshape(g * r, n)
    dev = x.device
    q = _flat_qpos(q_pos, g, dev)
    p, n_i, k, ks, tail = _exact_sorted(x, spec)
    allowed = x > float("-inf")
    xd = x.to(torch.float64)

    cols = torch.arange(n, device=dev)
    sink = allowed & (cols[None, :] < spec.sinks)
    local = (
        allowed
        & ~sink
        & (cols[None, :] <= q[:, None])
        & (cols[None, :] > q[:, None] - spec.window)
    )
    bulk = allowed & ~sink & ~local
    nb = bulk.sum(1)
    xb = torch.where(bulk, xd, 0.0)
    mean = xb.sum(1) / nb.clamp_min(1)
    var = (torch.where(bulk, xd - mean[:, None], 0.0) ** 2).sum(1) / nb.clamp_min(1)
    ok = nb >= 2
    nan = torch.full_like(mean, float("nan"))
    empty = n_i == 0
    nan_if_empty = lambda t: torch.where(empty, float("nan"), t)  # noqa: E731

    ent = -torch.xlogy(p, p).sum(1)
    part = 1.0 / (p * p).sum(1)
    mx = torch.where(allowed, xd, float("-inf")).amax(1)
    mabs = torch.where(allowed, xd.abs(), float("-inf")).amax(1)

    def sh(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(g, r, *t.shape[1:])

    return RowMetrics(
        n_keys=sh(n_i.to(torch.int64)),
        k_eps=sh(k),
        k_eps_sinks=sh(ks),
        tail_mass=sh(tail),
        participation=sh(nan_if_empty(part)),
        entropy=sh(nan_if_empty(ent)),
        sink_mass=sh(nan_if_empty(torch.where(sink, p, 0.0).sum(1))),
        local_mass=sh(nan_if_empty(torch.where(local, p, 0.0).sum(1))),
        bulk_mass=sh(nan_if_empty(torch.where(bulk, p, 0.0).sum(1))),
        bulk_mean=sh(torch.where(ok, mean, nan)),
        bulk_std=sh(torch.where(ok, var.sqrt(), nan)),
        max_score=sh(mx),
        max_abs_score=sh(mabs),
        n_bulk=sh(nb.to(torch.int64)),
    )
