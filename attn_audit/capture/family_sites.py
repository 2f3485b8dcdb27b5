"""How the attention calls of a tiny model pair with its eager attentions and its config, for
:mod:`attn_audit.capture.families`: which eager outputs are softmax layers, why call and layer
counts differ (one line), and whether the audit's probe records per-layer geometry as the calls
carry it."""

from __future__ import annotations

from typing import Any


def softmax_layers(config: Any, n: int) -> list[bool] | None:
    """Which of ``n`` eager attention outputs come from softmax attention layers, when the
    config's ``layer_types`` marks others (MiniMax's lightning / linear-attention layers, whose
    eager "weights" are a recurrent state, not probabilities); None when all are softmax layers."""
    from attn_audit.load import ATTENTION_LAYER_TYPES

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != n:
        return None
    keep = [t in ATTENTION_LAYER_TYPES for t in types]
    return keep if any(keep) and not all(keep) else None


def site_count_reason(model: Any, calls: list[tuple[Any, int, int]], n_ref: int, n_tokens: int) -> str:
    """Why the interface calls (``calls``: (module, query length, key length) each) do not pair
    one to one with the model's ``n_ref`` eager attention outputs, in one line."""
    from collections import Counter

    per_module = Counter(id(m) for m, _, _ in calls)
    by_id = {id(m): m for m, _, _ in calls}
    repeated = [(by_id[i], c) for i, c in per_module.items() if c > 1]
    if repeated:
        mod, count = repeated[0]
        return (f"{type(mod).__name__} calls the attention kernel {count} times per forward pass and combines the "
                "outputs (e.g. differential attention): the layer's attention weights are not one softmax distribution")
    other = [(m, q, k) for m, q, k in calls if q != n_tokens and k != n_tokens]
    if len(calls) > n_ref and other:
        names = sorted({type(m).__name__ for m, _, _ in other})
        return (f"{len(other)} of the {len(calls)} interface calls per forward pass ({', '.join(names)}) attend over "
                f"something other than the tokens (query length {other[0][1]}, {other[0][2]} keys, e.g. over earlier "
                "layers' outputs): not token attention, and not yet listed in interface.NOT_TOKEN_ATTENTION")
    called = {id(m) for m, _, _ in calls}
    silent = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")
                     and id(m) not in called and not any(id(c) in called for c in m.modules())})
    where = f" ({', '.join(silent[:3])} compute attention in their own code)" if silent else ""
    return f"only {len(calls)} of {n_ref} attention sites go through the attention interface{where}"


def want_geo(geo: dict[str, Any]) -> tuple[int, int, int, int]:
    """(sites, heads, kv heads, head_dim) as the config states them."""
    return (geo["num_layers"], geo["num_heads"], geo["num_kv_heads"], geo["head_dim"])


def geometry_check(model: Any, model_type: str, geo: dict[str, Any],
                   shapes: list[tuple[int, int, int]]) -> tuple[bool, str]:
    """(passes, one-line reason) when the calls' geometry (``shapes``: (heads, kv heads, d_qk)
    per call) differs from the config's ``geo`` (per layer, or everywhere): the audit's probe
    (:func:`attn_audit.capture.loop.probe_sites`) must record every site's geometry as the calls
    carry it, over as many sites as attention layers."""
    from attn_audit.capture.loop import probe_sites
    from attn_audit.load import model_info

    sites = len(shapes)
    if geo["num_layers"] != sites:
        return False, f"{sites} attention calls per forward pass but {geo['num_layers']} attention layers in its config"
    info = model_info(model, model_type, "sweep")
    try:
        probe_sites(model, info)
    except Exception as exc:  # noqa: BLE001 - the audit's own refusal is the reason
        return False, f"the audit's site probe fails: {type(exc).__name__}: {str(exc).strip()[:150]}"
    got = [tuple(g) for g in info.get("layer_heads") or []] or [
        (info["num_heads"], info["num_kv_heads"], info["head_dim"])] * sites
    if got != shapes:
        return False, f"per-layer (heads, kv heads, head_dim) {got} but the capture sees {shapes}"
    if info.get("layer_heads"):
        return True, "heads / head size per layer: " + ", ".join(f"{h}/{kv}x{d}" for h, kv, d in dict.fromkeys(shapes))
    return True, (f"geometry from the calls (heads, kv heads, head_dim) = {shapes[0]}; the config says "
                  f"{tuple(want_geo(geo)[1:])}")
