"""Per-row attention sparsity metrics (docs/methods.md §2; the bulk statistics feed §5.2).

:func:`row_metrics` receives the full pre-softmax scores of a block of query rows and
returns, per row, the exact mass-based sparsity counts ``k_eps`` (smallest k whose top-k
probabilities reach ``1 - eps``), the sink-forced variant ``k_eps_sinks``, top-k tail
masses, the effective support (participation ratio, entropy), the sink / local / bulk mass
split and the bulk logit statistics used by the Gaussian prediction of section 5.
:func:`reference_row_metrics` is the brute-force float64 definition (softmax, full sort,
cumulative sum) that the kernels must match; the integers match it exactly.

Two kernels compute the same thing without sorting whole rows: on CPU a compiled per-row
kernel (:mod:`attn_audit.rows.cpu`, numba), on other devices a vectorised torch kernel
(:mod:`attn_audit.rows.torch_kernel`). Both flag the rows whose decision falls inside a rigorous
rounding margin; those are recomputed here with the reference routine itself.
"""

from __future__ import annotations

import torch

from attn_audit.config import MeasureSpec
from attn_audit.errors import ConfigError
from attn_audit.rows.reference import _exact_sorted
from attn_audit.rows.spec import RowMetrics, _check_inputs


@torch.no_grad()
def row_metrics(
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    spec: MeasureSpec,
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
        raise ConfigError(f"backend must be auto, cpu or torch, got {backend!r}")
    use_torch = backend == "torch" or (backend == "auto" and scores.device.type != "cpu")
    if causal and use_torch:
        scores = _mask_after(scores, q_pos)
    if use_torch:
        from attn_audit.rows.torch_kernel import torch_row_metrics

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


def _cpu_row_metrics(scores: torch.Tensor, q_pos: torch.Tensor, spec: MeasureSpec,
                     force_fallback: bool, weights_out: torch.Tensor | None = None,
                     causal: bool = False) -> RowMetrics:
    """The compiled kernel (:mod:`attn_audit.rows.cpu`) on a CPU copy of (G, R, n) scores."""
    from attn_audit.rows.cpu import rows_kernel

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
    from attn_audit.rows.torch_stream import clear_workspace as clear

    clear()
