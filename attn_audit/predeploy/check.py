"""``--check-config FILE``: a third-party pattern config checked against the model, measured on the
user's data, and verified like a plan.

Steps: read and validate the file against the model (:func:`~attn_audit.predeploy.configs.read_config`,
exit 2 with one line naming the entry on a misfit); the attention mass every patterned head keeps,
row by row, on the held-out sequences (exact probabilities, the model's own outputs); heads whose
90th-percentile row loses more than ε are listed; then the patterns run inside the model for the
model-wide quality and, for causal LMs, the passkey retrieval check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attn_audit.predeploy.configs import read_config
from attn_audit.predeploy.patterns import kept_mass, pattern_installer
from attn_audit.predeploy.retrieval import retrieval_check
from attn_audit.verify import quality_under

LOSS_QUANTILE = 0.9


def check_config(model: Any, tokenizer: Any, info: dict[str, Any], path: str, sequences: list[list[int]],
                 filler: Sequence[int], *, eps: float, batch_size: int, pad_id: int, retrieval_samples: int,
                 retrieval_lens: Sequence[int], seed: int) -> dict[str, Any]:
    """The ``check_config`` block of audit.json for the config at ``path``."""
    fmt, patterns, settings = read_config(path, info)
    sparse = {hk: p for hk, p in patterns.items() if p.kind != "dense"}
    lost = kept_mass(model, sequences, sparse, batch_size, pad_id) if sparse else {}
    heads = []
    for (layer, head), p in sorted(sparse.items()):
        rows = lost.get((layer, head), np.zeros(0))
        heads.append({
            "layer": layer, "head": head, "pattern": p.describe(), "rows": int(rows.size),
            "kept_mass_mean": float(1.0 - rows.mean()) if rows.size else None,
            "lost_mass_mean": float(rows.mean()) if rows.size else None,
            "lost_mass_p90": float(np.quantile(rows, LOSS_QUANTILE)) if rows.size else None,
        })
    losing = [h for h in heads if h["lost_mass_p90"] is not None and h["lost_mass_p90"] > eps]
    install = pattern_installer(sparse)
    causal = bool(info["causal"])
    block: dict[str, Any] = {
        "file": str(path),
        "format": fmt,
        "settings": settings,
        "heads_total": (sum(g[0] for g in info["layer_heads"]) if info.get("layer_heads")
                        else info["num_layers"] * info["num_heads"]),
        "heads_sparse": len(sparse),
        "eps": eps,
        "loss_rule": f"a head loses more than eps when its {LOSS_QUANTILE:.0%} quantile of per-row lost mass does",
        "sequences": len(sequences),
        "seq_len": max((len(s) for s in sequences), default=0),
        "heads": heads,
        "heads_losing": [{k: h[k] for k in ("layer", "head", "pattern", "lost_mass_p90")} for h in losing],
        "quality": quality_under(install, model, sequences, batch_size, pad_id, causal) if sequences else None,
    }
    if not causal:
        block["retrieval"] = {"skipped_reason": "an encoder does not generate, so there is no passkey to ask for"}
    elif retrieval_samples and retrieval_lens:
        try:
            block["retrieval"] = retrieval_check(model, tokenizer, filler, retrieval_lens, retrieval_samples,
                                                 lambda n: install, label=f"{fmt} config", seed=seed,
                                                 batch_size=batch_size)
        except ValueError as exc:  # the length cannot hold a passkey prompt
            block["retrieval"] = {"skipped_reason": f"{exc}; give a longer --retrieval-len"}
    return block
