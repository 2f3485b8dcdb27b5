"""Per-row attention sparsity metrics (theory.md sections 2, 5.2 and 8).

:func:`row_metrics` receives the full pre-softmax scores of a block of query rows and
returns, per row, the exact mass-based sparsity counts ``k_eps`` (smallest k whose top-k
probabilities reach ``1 - eps``), the sink-forced variant ``k_eps_sinks``, top-k tail
masses, the effective support (participation ratio, entropy), the sink / local / bulk mass
split and the bulk logit statistics used by the Gaussian prediction of section 5.
:func:`reference_row_metrics` is the brute-force float64 definition (softmax, full sort,
cumulative sum) that the kernels must match; the integers match it exactly.

Two kernels compute the same thing without sorting whole rows: on CPU a compiled per-row
kernel (:mod:`attn_audit.rows_cpu`, numba), on other devices a vectorised torch kernel
(:mod:`attn_audit.rows_torch`). Both flag the rows whose decision falls inside a rigorous
rounding margin; those are recomputed here with the reference routine itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = [
    "RowSpec",
    "RowMetrics",
    "row_metrics",
    "reference_row_metrics",
    "clear_workspace",
]

_CAP_NATS = 16.0
"""Bins cover at most ``ln(n) + _CAP_NATS`` nats below the row maximum; keys further away
carry at most ``n * e^-(ln n + 16) = 1.1e-7`` of the mass together."""


def num_bins(n: int) -> int:
    """Regular histogram bins per row for rows of length n (both kernels): about n/4,
    between 64 and 4096."""
    return int(min(4096, max(64, n // 4)))


def bin_span_cap(n: int) -> float:
    """Largest distance (nats below the row max) resolved by the bins for rows of length n."""
    return min(math.log(max(n, 2)) + _CAP_NATS, 40.0)


@dataclass(frozen=True)
class RowSpec:
    """What to measure per row.

    eps: mass tolerances, each in (0, 1), e.g. ``(0.01, 0.05, 0.1)``.
    budgets: top-k budgets for the tail mass.
    sinks: number of leading key positions treated as attention sinks (0 allowed).
    window: local window; key j is local for a query at position q if ``q - window < j <= q``.
    """

    eps: tuple[float, ...]
    budgets: tuple[int, ...] = (16, 64, 256)
    sinks: int = 1
    window: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))
        for e in self.eps:
            if not 0.0 < e < 1.0:
                raise ValueError(f"eps must lie in (0, 1), got {e}")
        for b in self.budgets:
            if b < 1:
                raise ValueError(f"budgets must be >= 1, got {b}")
        if self.sinks < 0:
            raise ValueError("sinks must be >= 0")
        if self.window < 0:
            raise ValueError("window must be >= 0")


@dataclass
class RowMetrics:
    """Per-row metrics; every field has leading shape (G, R) (G heads, R query rows).

    n_keys: int64 (G, R), number of allowed keys n_i.
    k_eps: int64 (G, R, E), smallest k whose top-k probabilities sum to >= 1 - eps.
    k_eps_sinks: int64 (G, R, E), |S_i| + min k with sink mass + top-k non-sink mass >= 1 - eps.
    tail_mass: float64 (G, R, B), 1 - (sum of the top-min(b, n_i) probabilities), >= 0.
    participation: float64 (G, R), 1 / sum p^2.
    entropy: float64 (G, R), -sum p ln p in nats.
    sink_mass: float64 (G, R), mass on allowed keys with index < spec.sinks.
    local_mass: float64 (G, R), mass on allowed keys of the local window (sinks excluded).
    bulk_mass: float64 (G, R), mass on allowed keys that are neither sink nor local.
    bulk_mean: float64 (G, R), mean raw score over bulk keys (NaN if fewer than 2).
    bulk_std: float64 (G, R), std (ddof=0) of raw scores over bulk keys (NaN if fewer than 2).
    max_score: float64 (G, R), max allowed score.
    max_abs_score: float64 (G, R), max |s_ij| over allowed keys.
    n_bulk: int64 (G, R), number of bulk keys (extra field, optional).
    mass: float64 (G, R), sum over allowed keys of exp(s - max score) (only with
        ``row_metrics(..., weights_out=...)``; 0 for rows without allowed keys).

    Rows without any allowed key have n_keys = k_eps = k_eps_sinks = 0; their float fields
    may be NaN.
    """

    n_keys: torch.Tensor
    k_eps: torch.Tensor
    k_eps_sinks: torch.Tensor
    tail_mass: torch.Tensor
    participation: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor
    local_mass: torch.Tensor
    bulk_mass: torch.Tensor
    bulk_mean: torch.Tensor
    bulk_std: torch.Tensor
    max_score: torch.Tensor
    max_abs_score: torch.Tensor
    n_bulk: torch.Tensor | None = None
    mass: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------


def _check_inputs(scores: torch.Tensor, q_pos: torch.Tensor) -> tuple[int, int, int]:
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (G, R, n), got {tuple(scores.shape)}")
    g, r, n = scores.shape
    if q_pos.shape != (r,):
        raise ValueError(f"q_pos must have shape ({r},), got {tuple(q_pos.shape)}")
    if not scores.is_floating_point():
        raise TypeError("scores must be a floating tensor")
    return g, r, n


def _flat_qpos(q_pos: torch.Tensor, g: int, device: torch.device) -> torch.Tensor:
    """(R,) -> (G*R,) int64, row g*R + r gets q_pos[r]."""
    return q_pos.to(device=device, dtype=torch.int64).repeat(g)


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
    x: torch.Tensor, spec: RowSpec
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
    scores: torch.Tensor, q_pos: torch.Tensor, spec: RowSpec
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


# ---------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def row_metrics(
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    spec: RowSpec,
    *,
    backend: str = "auto",
    chunk_elems: int = 1 << 19,
    weights_out: torch.Tensor | None = None,
    causal: bool = False,
    _force_fallback: bool = False,
) -> RowMetrics:
    """Exact per-row sparsity metrics without sorting whole rows.

    scores: float (G, R, n) pre-softmax logits (float32 typically; already scaled /
        soft-capped) with disallowed keys set to ``-inf`` (causal, padding and
        sliding-window masks are encoded this way). Key j has position j. ``+inf`` and NaN
        are not allowed.
    q_pos: int64 (R,) position of each query row (used for the local window, and as a hint
        for skipping fully masked trailing key columns).
    spec: what to measure.
    backend: "auto" (the compiled CPU kernel for CPU tensors, the torch kernel elsewhere),
        "cpu" or "torch".
    chunk_elems: scores streamed per step by the torch kernel (cache-sized).
    weights_out: optional float32 (G, R, n) tensor, contiguous, on the device of ``scores``,
        that receives the unnormalised attention weights exp(s - row max) (0 on masked keys);
        their row sums come back in ``mass``, so that ``weights_out / mass`` is the softmax
        (the caller finishes the attention output without another pass over the logits).
    causal: keys j > q_pos[r] are disallowed whatever ``scores`` holds there (the caller
        need not write -inf into them).

    Returns a :class:`RowMetrics` whose fields have leading shape (G, R), on the device of
    ``scores``. ``n_keys``, ``k_eps``, ``k_eps_sinks`` and ``max_score`` equal those of
    :func:`reference_row_metrics` exactly; the masses (tail, sink / local / bulk), entropy
    and participation agree to ~1e-12 (tail masses of keys more than ln n + 16 nats below
    the row maximum: < 1.2e-7); bulk statistics to ~1e-12 relative.
    Rows with no allowed key get ``n_keys = k_eps = k_eps_sinks = 0`` and NaN float fields.
    """
    g, r, n = _check_inputs(scores, q_pos)
    if backend not in ("auto", "cpu", "torch"):
        raise ValueError(f"backend must be auto, cpu or torch, got {backend!r}")
    use_torch = backend == "torch" or (backend == "auto" and scores.device.type != "cpu")
    if causal and use_torch:
        scores = _mask_after(scores, q_pos)
    if use_torch:
        from attn_audit.rows_torch import torch_row_metrics

        res = torch_row_metrics(scores, q_pos, spec, chunk_elems=chunk_elems,
                                force_fallback=_force_fallback)
        if weights_out is not None:
            mx = scores.amax(-1, keepdim=True)
            torch.exp(scores - mx.masked_fill(mx == float("-inf"), 0.0), out=weights_out)
            res.mass = weights_out.sum(-1, dtype=torch.float64)
        return res
    return _cpu_row_metrics(scores, q_pos, spec, _force_fallback, weights_out, causal)


def _mask_after(x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """A copy of scores ``x`` (..., R, n) with the keys after each row's query position
    (``q_pos``: (R,)) set to -inf (what ``causal=True`` leaves unmasked)."""
    late = torch.arange(x.shape[-1], device=x.device)[None, :] > q_pos.to(x.device)[:, None]
    return x.masked_fill(late, float("-inf"))


def _cpu_row_metrics(scores: torch.Tensor, q_pos: torch.Tensor, spec: RowSpec,
                     force_fallback: bool, weights_out: torch.Tensor | None = None,
                     causal: bool = False) -> RowMetrics:
    """The compiled kernel (:mod:`attn_audit.rows_cpu`) on a CPU copy of (G, R, n) scores."""
    from attn_audit.rows_cpu import rows_kernel

    g, r, n = scores.shape
    dev = scores.device
    x = scores.detach().to("cpu")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half / bfloat16 values are exact in float32
    x = x.reshape(g * r, n).contiguous()
    w_np = None
    if weights_out is not None:
        if weights_out.shape != scores.shape or weights_out.dtype != torch.float32 or (
            weights_out.device.type != "cpu" or not weights_out.is_contiguous()
        ):
            raise ValueError("weights_out must be a contiguous float32 CPU tensor shaped like scores")
        w_np = weights_out.view(g * r, n).numpy()
    out = rows_kernel(x.numpy(), q_pos.detach().cpu().numpy(), r, spec.eps, spec.budgets,
                      spec.sinks, spec.window, threads=torch.get_num_threads(), weights_out=w_np,
                      causal=causal)
    mass = out.pop("mass")
    if weights_out is None:
        mass = None
    redo = out.pop("redo")
    if force_fallback:
        redo = out["n_keys"] > 0
    res = {k: torch.from_numpy(v) for k, v in out.items()}
    idx = torch.from_numpy(redo.nonzero()[0])
    step = max(1, (1 << 22) // max(n, 1))
    for a0 in range(0, len(idx), step):  # rows inside the rounding margin: the reference decides
        rows = idx[a0 : a0 + step]
        xr = x[rows]
        if causal:
            xr = _mask_after(xr, q_pos.cpu()[rows % r])
        _, _, k, ks, tail = _exact_sorted(xr, spec)
        res["k_eps"][rows] = k
        res["k_eps_sinks"][rows] = ks
        res["tail_mass"][rows] = tail
    fields_ = {k: v.view(g, r, *v.shape[1:]).to(dev) for k, v in res.items()}
    if mass is not None:
        fields_["mass"] = torch.from_numpy(mass).view(g, r).to(dev)
    return RowMetrics(**fields_)


def clear_workspace() -> None:
    """Release the scratch buffers kept by the torch kernel in the calling thread."""
    from attn_audit.rows_torch import clear_workspace as clear

    clear()
