"""Stage ``capture``: run the model and reduce every layer's attention call as it happens.

``interface`` registers a function in transformers' attention interface that sees each layer's
query, key and value (post-RoPE, before GQA's ``repeat_kv``), the mask and every keyword (honoured
or refused by name), for any family; ``hooks`` adds the optional pre-RoPE projections where the
projections are known; ``families`` checks a tiny model of any ``model_type`` against its eager
attention (the registry sweep); models computing attention outside the interface are read
through their eager probabilities (``loop.fallback_calls``); ``accumulate`` folds each call into
fixed-size per-head state (``totals``: running row metrics, ``reservoir``: bounded, mergeable
samples); ``seq2seq`` feeds encoder-decoder models (teacher-forced decoder input) and labels
their encoder-self / decoder-self / cross sites; ``loop`` runs the batches of one length with
``checkpoint`` (resume) and ``distributed`` (torchrun shards).
"""

from __future__ import annotations

from attn_audit.capture.accumulate import AccumulateConfig, Accumulator
from attn_audit.capture.checkpoint import Checkpointer, run_parts
from attn_audit.capture.hooks import projection_hooks, projection_weights
from attn_audit.capture.interface import (
    AttentionCall,
    attention_probs,
    capturing,
    scores,
)
from attn_audit.capture.loop import capture_length

__all__ = [
    "AccumulateConfig", "Accumulator", "AttentionCall", "Checkpointer", "attention_probs", "capture_length", "run_parts",
    "capturing", "projection_hooks", "projection_weights", "scores",
]  # fmt: skip
