"""Checks an ``audit.json`` read by ``--load`` field by field before anything renders it (stdlib
only). The file is untrusted: every field the reports, the gate, the ranking and the exports
read is checked for its type, integers for their range, and the whole document for size, depth
and number of values, so a wrong file ends in one line (:class:`ResultFileError`), never a
traceback, a hang or unbounded memory.

A spec is a type name (``"int"``, ``"num"`` a finite int or float, ``"str"``, ``"bool"``,
``"any"``; a trailing ``?`` allows null), a one-item list (a list of that spec), or a dict of
key -> spec where a key ending in ``?`` is optional and ``"*"`` is the spec of every other key.
"""

from __future__ import annotations

import math
from typing import Any

from attn_audit.errors import ResultFileError

MAX_BYTES = 256 << 20  # an audit of a 100-layer, 128-head model is ~100 MB
MAX_DEPTH = 32
MAX_VALUES = 20_000_000
MAX_HEADS = 1 << 20  # layers x heads
MAX_INT = 1 << 53

_NUMS = {"k_mean": "num?", "k_median": "num?", "k_p90": "num?", "kfrac_mean": "num?", "rows": "int?", "*": "any"}
HEAD = {
    "layer": "int", "head": "int", "kv_head": "int",
    "sparsity": {"*": _NUMS},
    "tail_mass?": {"*": "num?"},
    "entropy_mean?": "num?", "participation_mean?": "num?", "sink_mass_mean?": "num?",
    "local_mass_mean?": "num?", "bulk_mass_mean?": "num?", "nonfinite_rows?": "int?",
    "R?": {"note?": "str", "*": "num?"},  # note: why weight-based R is absent, or its form
    "gaussianity?": {"*": {"verdict?": "str?", "*": "any"}},
    "by_length?": {"*": {"sparsity?": {"*": _NUMS}, "*": "any"}},
    "flags?": ["str"], "score?": "num?", "rank?": "int?",
    "site_kind?": "str", "stack_layer?": "int", "causal?": "bool",  # encoder-decoder sites
    "*": "any",
}
RANKED = {"layer": "int", "head": "int", "kv_head?": "int", "score?": "num?", "rank?": "int?", "k?": "int?",
          "kfrac?": "num?", "flops_saving?": "num?", "reason?": "str?", "flags?": ["str"],
          "site_kind?": "str", "stack_layer?": "int", "causal?": "bool", "*": "any"}
TOP = {
    "schema_version": "int",
    "tool?": {"*": "any"},
    "model": {
        "name": "str", "family?": "str?", "num_layers": "int", "num_heads": "int", "num_kv_heads": "int",
        "head_dim?": "int?", "causal?": "bool", "max_positions?": "int?", "rope?": "bool",
        "sliding_window?": "int?", "dtype?": "str?", "revision?": "str?", "source?": "str?",
        "encoder_decoder?": "bool", "site_kinds?": [{"site": "int", "kind": "str", "stack_layer": "int"}],
        "layer_causal?": ["bool"], "*": "any",
    },
    "run": {
        "seq_len": "int", "seq_lens?": ["int"], "num_sequences?": "int", "eps?": ["num"], "eps_keys": ["str"],
        "min_keys?": "int", "rows?": "str", "rows_per_sequence?": "int?", "seed?": "int", "budgets?": ["int"],
        "sinks?": "int", "window?": "int", "batch_size?": "int", "device?": "str", "sites?": ["str"],
        "versions?": {"*": "str?"}, "dataset?": {"spec?": "str?", "*": "any"}, "*": "any",
    },
    "heads": [HEAD],
    "ranking": [RANKED],
    "plan?": [RANKED],
    "plan_summary?": {"target_len?": "int", "eps_key?": "str", "heads_planned?": "int", "heads_total?": "int",
                      "planned_flops_saving?": "num?", "text?": "str", "excluded?": [{"*": "any"}], "*": "any"},
    "gate?": {"*": "any"},
    "verify?": {"*": "any"},
    "*": "any",
}


def _fail(source: str, where: str, what: str) -> ResultFileError:
    return ResultFileError(f"{source}: {where} {what}; is it an audit.json written by attn-audit?")


def _check(value: Any, spec: Any, where: str, source: str) -> None:
    """Iterative only in breadth; recursion depth is bounded by the spec's depth (not the file's)."""
    if isinstance(spec, str):
        if spec == "any":
            return
        nullable = spec.endswith("?")
        kind = spec.rstrip("?")
        if value is None:
            if nullable:
                return
            raise _fail(source, where, "is null")
        ok = {
            "int": lambda v: type(v) is int and -MAX_INT <= v <= MAX_INT,
            "num": lambda v: type(v) in (int, float) and math.isfinite(v),
            "str": lambda v: isinstance(v, str),
            "bool": lambda v: isinstance(v, bool),
        }[kind](value)
        if not ok:
            raise _fail(source, where, f"is not {'an integer' if kind == 'int' else 'a ' + kind}"
                        f"{' in range' if kind == 'int' and type(value) is int else ''}")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise _fail(source, where, "is not a list")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", source)
        return
    if not isinstance(value, dict):
        raise _fail(source, where, "is not an object")
    for key, sub in spec.items():
        if key == "*":
            continue
        name = key.rstrip("?")
        if name not in value:
            if not key.endswith("?"):
                raise _fail(source, f"{where}.{name}", "is missing")
            continue
        _check(value[name], sub, f"{where}.{name}", source)
    rest = spec.get("*")
    if rest is not None and rest != "any":
        named = {k.rstrip("?") for k in spec}
        for k, v in value.items():
            if k not in named:
                _check(v, rest, f"{where}.{k}", source)


def check_bounds(data: Any, source: str) -> None:
    """Depth and number of values of the whole document (an explicit stack: no recursion)."""
    stack = [(data, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH or count > MAX_VALUES:
            what = f"nests deeper than {MAX_DEPTH} levels" if depth > MAX_DEPTH else f"holds over {MAX_VALUES} values"
            raise ResultFileError(f"{source} {what}; is it an audit.json written by attn-audit?")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _layer_heads(m: dict[str, Any], source: str) -> list[tuple[int, int]] | None:
    """The model block's per-layer (heads, kv heads) when they vary between layers, else None."""
    per_layer = m.get("layer_heads")
    if per_layer is None:
        return None
    ok = (isinstance(per_layer, list) and len(per_layer) == m["num_layers"]
          and all(isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) and x > 0 for x in g)
                  and g[0] % g[1] == 0 and g[0] <= m["num_heads"] and g[1] <= m["num_kv_heads"] for g in per_layer))
    if not ok:
        raise _fail(source, "$.model.layer_heads", "is not one [heads, kv heads, head_dim] per layer within the "
                    "model's largest")
    return [(g[0], g[1]) for g in per_layer]


def validate(data: dict[str, Any], source: str) -> None:
    """Raise :class:`ResultFileError` naming the first field that is missing or of the wrong type,
    or a count that does not fit the model block (heads != layers x heads, a head out of range)."""
    check_bounds(data, source)
    _check(data, TOP, "$", source)
    m = data["model"]
    layers, heads, kv = m["num_layers"], m["num_heads"], m["num_kv_heads"]
    if not (1 <= layers and 1 <= heads and 1 <= kv <= heads and heads % kv == 0 and layers * heads <= MAX_HEADS):
        raise _fail(source, "$.model", f"has {layers} layers x {heads} heads ({kv} KV heads), which is not a model")
    per_layer = _layer_heads(m, source)
    want = f"{layers} x {heads}" if per_layer is None else "the sum of model.layer_heads"
    if per_layer is None:
        per_layer = [(heads, kv)] * layers
    total = sum(h for h, _ in per_layer)
    if len(data["heads"]) != total:
        raise _fail(source, "$.heads", f"holds {len(data['heads'])} records, not {want}")
    seen = set()
    for i, h in enumerate(data["heads"]):
        key = (h["layer"], h["head"])
        lh, lkv = per_layer[h["layer"]] if 0 <= h["layer"] < layers else (0, 0)
        if not (0 <= h["head"] < lh and 0 <= h["kv_head"] < lkv) or key in seen:
            raise _fail(source, f"$.heads[{i}]", f"names head L{h['layer']}.H{h['head']} (kv {h['kv_head']}) "
                        "out of range or twice")
        seen.add(key)
    keys = data["run"]["eps_keys"]
    if not keys:
        raise _fail(source, "$.run.eps_keys", "is empty")
    for k in keys:
        try:
            ok = 0.0 < float(k) < 1.0
        except ValueError:
            ok = False
        if not ok:
            raise _fail(source, "$.run.eps_keys", f"holds {k[:40]!r}, not an eps in (0, 1)")
    for rec in (*data["ranking"], *data.get("plan", [])):
        if (rec["layer"], rec["head"]) not in seen:
            raise _fail(source, "$.ranking", f"names head L{rec['layer']}.H{rec['head']} that is not in heads")
