"""``heads[].patterns``: each kernel pattern's measured coverage per head (numpy only, no torch).

From the pattern totals of the primary length (:mod:`attn_audit.capture.pattern_totals`), per head::

    "patterns": {
      "block_size": 64, "seq_len": 512, "levels": 8, "rows": 2304,
      "by_pattern": {
        "<name>": {
          "unit": what one level is,
          "kept_mass": [mean kept mass at level 0, 1, .., levels],
          "by_eps": {"0.05": {"level_p90": 3, "covered_at_p90": 0.91, "kept_mass_at_p90": 0.97,
                              "tiles_saving_p90": 0.41, <budget fields>}}
        }}}

``level_p90`` is the smallest level at which at least 90% of the measured rows keep ``1 − eps`` of
their mass (the rows k_eps is measured on); ``tiles_saving_p90`` the share of whole tiles saved
at that level at the audited length (:func:`attn_audit.rank.kernel.tiles`). Dynamic patterns
carry ``estimate_flops``, the FLOPs their selection costs per head and sequence at that length. ``block-topk`` also
reports ``covered_at_oracle_p90``: the share of rows its cheap estimate covers at the level the
``block-oracle`` needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_audit.rank.kernel import (
    DYNAMIC,
    budget_fields,
    estimate_flops,
    level_at,
    tiles,
)

UNITS = {
    "row-topk": "level b keeps each row's b*block largest probabilities (oracle, no kernel)",
    "block-oracle": "level b keeps each row's b heaviest key blocks (oracle block selection)",
    "block-topk": "level b keeps b key blocks per query block: the diagonal block, then by "
                  "mean-pooled Q.K block score",
    "streaming": "level b keeps the sink block (key block 0) and the b key blocks ending at the "
                 "query's block",
    "vertical-slash": "level b keeps the top b*block key columns and b*block diagonals ranked by "
                      "the attention of the last 64 queries (first 30 columns, 100 nearest "
                      "diagonals forced)",
}


def add_patterns(heads: list[dict[str, Any]], summary: dict[str, Any], eps_keys: list[str],
                 seq_len: int, causal: bool, sinks: int, head_dim: int = 0) -> None:
    """Add ``patterns`` to every head record from the primary length's ``summary["patterns"]``."""
    pt = summary.get("patterns")
    if not pt:
        return
    block, nb = int(pt["block_size"]), int(pt["nb"])
    model_causal = causal
    for rec in heads:
        layer, head = rec["layer"], rec["head"]
        causal = rec.get("causal", model_causal)  # per site in an encoder-decoder model
        dense = tiles(seq_len, block, causal, "dense", 0)
        rows = int(pt["rows"][layer, head])
        by_pattern: dict[str, Any] = {}
        for name, hist_all in pt["need_hist"].items():
            if not hist_all.any() or (rows and not hist_all[layer, head].any()):
                continue  # not measurable here (vertical-slash on a bidirectional model or site)
            hist = hist_all[layer, head]  # (E, nb + 2)
            kept = pt["kept_sum"][name][layer, head] / rows if rows else np.full(nb + 1, np.nan)
            entry: dict[str, Any] = {"unit": UNITS[name],
                                     "kept_mass": [_round(x) for x in kept]}
            if name in DYNAMIC:  # FLOPs spent choosing the blocks, per head and sequence
                entry["estimate_flops"] = estimate_flops(seq_len, block, head_dim, causal, name)
            by_eps = {}
            for e, key in enumerate(eps_keys):
                level = level_at([int(c) for c in hist[e]], 0.9)
                if level is None:
                    by_eps[key] = {"level_p90": None}
                    continue
                level = min(level, nb)
                cum = np.cumsum(hist[e])
                item: dict[str, Any] = {
                    "level_p90": int(level),
                    "covered_at_p90": _round(cum[level] / rows),
                    "kept_mass_at_p90": _round(kept[level]),
                }
                if name != "row-topk":
                    pat = "block-topk" if name == "block-oracle" else name
                    used = tiles(seq_len, block, causal, pat, level, sinks)
                    item["tiles_saving_p90"] = _round(1.0 - used / dense) if dense else 0.0
                    item.update(budget_fields(pat, level, block, sinks))
                else:
                    item["keys"] = min(level * block, seq_len)
                by_eps[key] = item
            entry["by_eps"] = by_eps
            by_pattern[name] = entry
        if "block-topk" in by_pattern and "block-oracle" in pt["need_hist"]:
            for e, key in enumerate(eps_keys):
                oracle = by_pattern["block-oracle"]["by_eps"][key].get("level_p90")
                if oracle is not None and rows:
                    est_hist = pt["need_hist"]["block-topk"][layer, head, e]
                    by_pattern["block-topk"]["by_eps"][key]["covered_at_oracle_p90"] = _round(
                        est_hist[: oracle + 1].sum() / rows)
        rec["patterns"] = {"block_size": block, "seq_len": seq_len, "levels": nb, "rows": rows,
                           "by_pattern": by_pattern}


def _round(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if np.isfinite(x) else None
