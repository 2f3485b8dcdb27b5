"""Shared fixtures: real bundled models (loaded once per session) and tiny random configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once from the bundled GGUF, then cached)."""
    from attn_audit.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M base (assembled and converted once from the bundled GGUF, then cached)."""
    from attn_audit.load import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder."""
    from attn_audit.load import load_model

    return load_model("all-minilm-l6-v2")


TINY = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128),
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    "mistral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=256, max_position_embeddings=128, sliding_window=8),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=256, max_position_embeddings=128, rotary_pct=0.5),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=128),
}


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised 2-layer model of ``family`` (architecture coverage only)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **TINY[family])
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="sdpa").eval()
