"""The pre-deployment checks beyond perplexity: long-context retrieval with the plan installed,
third-party pattern configs (MInference, DuoAttention, flex plans) checked against the model
and measured on the user's data, and the plan's attention timed against the dense kernel.

Every check takes the plan as one pluggable step, an *installer*: ``install(model)`` returns a
context manager inside which the model runs the plan (:data:`Installer`).
"""

from __future__ import annotations

from attn_audit.predeploy.check import check_config
from attn_audit.predeploy.configs import detect_format, read_config
from attn_audit.predeploy.patterns import (
    Pattern,
    keep_mask,
    kept_mass,
    pattern_installer,
)
from attn_audit.predeploy.retrieval import (
    DEPTHS,
    Installer,
    build_prompts,
    retrieval_check,
    retrieved,
)
from attn_audit.predeploy.speed import measured_plan, plan_speed

__all__ = [
    "DEPTHS",
    "Installer",
    "Pattern",
    "build_prompts",
    "check_config",
    "detect_format",
    "keep_mask",
    "kept_mass",
    "measured_plan",
    "pattern_installer",
    "plan_speed",
    "read_config",
    "retrieval_check",
    "retrieved",
]
