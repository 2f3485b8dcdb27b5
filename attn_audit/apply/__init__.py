"""Run a plan inside the model: each planned head's kernel pattern with FlexAttention.

::

    import attn_audit
    attn_audit.apply_plan(model, "out/flex_plan.json")  # or an AuditResult, or a plan dict
    logits = model(input_ids).logits                     # planned heads run their pattern
    attn_audit.remove_plan(model)                        # back to the model's own kernel

:func:`apply_plan` registers an attention function in transformers' ``AttentionInterface`` (the
same interface the capture uses) and switches the model to it. In a layer with planned heads it
builds one FlexAttention block mask per call (``create_block_mask``, per head, from the current
input for the dynamic patterns, with the selection functions of :mod:`attn_audit.rows.patterns`,
so what runs is what the audit measured) and runs ``flex_attention`` with ``enable_gqa=True``
(K/V are not repeated); the layer's unplanned heads, and layers without planned heads, run the
model's own kernel (``sdpa``). Decode steps (queries fewer than keys) run the model's kernel too.
"""

from __future__ import annotations

from attn_audit.apply.flex import apply_plan, remove_plan
from attn_audit.apply.plan import HeadPattern, LoadedPlan, load_plan

__all__ = ["HeadPattern", "LoadedPlan", "apply_plan", "load_plan", "remove_plan"]
