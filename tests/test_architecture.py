"""The floor plan: stage packages, no private seams or re-exports across them, no import cycle,
and torch only where the data flow needs it (walked with pkgutil, not hand-written lists)."""

from __future__ import annotations

import ast
import pkgutil
import sys
from collections import defaultdict
from pathlib import Path

import attn_audit
from tests.helpers import run_python

PKG = Path(attn_audit.__file__).parent
STAGE_PACKAGES = {"capture", "rows", "stats", "theory", "assemble", "rank", "apply", "report", "gate", "export",
                  "predeploy"}
TOP_MODULES = {"__init__", "__main__", "api", "cli", "config", "data", "errors", "load", "outdir", "progress",
               "provenance", "result", "schema", "verify"}
# torch may be imported only by these stages (and by the orchestration that calls them)
TORCH_STAGES = {"load", "data", "capture", "rows", "apply", "verify", "predeploy"}
ORCHESTRATION = {"api", "cli", "provenance", "__main__"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (pkgutil walk)."""
    out = {"attn_audit": PKG / "__init__.py"}
    for info in pkgutil.walk_packages([str(PKG)], prefix="attn_audit."):
        spec = info.module_finder.find_spec(info.name.rsplit(".", 1)[-1], None)  # type: ignore[call-arg]
        assert spec is not None and spec.origin, info.name
        out[info.name] = Path(spec.origin)
    return out


def _stage(module: str) -> str:
    """The stage a module belongs to: its package under attn_audit, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every ``from attn_audit... import name`` / ``import attn_audit...``
    anywhere in the file, function-local imports included."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("attn_audit"):
            found.extend((node.module, a.name) for a in node.names)  # type: ignore[misc]
        elif isinstance(node, ast.Import):
            found.extend((a.name, None) for a in node.names if a.name.startswith("attn_audit"))
    return found


def _target(module: str, name: str | None, modules: dict[str, Path]) -> str:
    """The module an import refers to (``from attn_audit.capture import loop`` -> the submodule)."""
    if name is not None and f"{module}.{name}" in modules:
        return f"{module}.{name}"
    return module


def test_top_level_shows_the_stages() -> None:
    entries = {p.stem if p.suffix == ".py" else p.name for p in PKG.iterdir()
               if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())}
    assert entries == STAGE_PACKAGES | TOP_MODULES
    for pkg in STAGE_PACKAGES:
        assert (PKG / pkg / "__init__.py").read_text(encoding="utf-8").lstrip().startswith('"""'), pkg


def test_no_private_name_crosses_a_package() -> None:
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        for target_mod, name in _imports(path):
            target = _target(target_mod, name, modules)
            if _stage(target) == _stage(mod):
                continue
            private = (name is not None and name.startswith("_") and not name.startswith("__")
                       and target == target_mod)
            if private or any(part.startswith("_") and part != "__init__" for part in target.split(".")[1:]):
                bad.append(f"{mod} imports {target_mod}.{name}")
    assert not bad, bad


def test_only_package_entries_re_export() -> None:
    """A module's ``__all__`` lists only its own names; a package ``__init__`` only names of its
    own package."""
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        exported: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                value = node.value
                if isinstance(value, (ast.List, ast.Tuple)):
                    exported = {e.value for e in value.elts if isinstance(e, ast.Constant)}
        imported_from = {a.asname or a.name: node.module for node in tree.body
                         if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attn_audit")
                         for a in node.names}
        is_entry = path.name == "__init__.py"
        for name in exported & set(imported_from):
            src = imported_from[name]
            if not is_entry or _stage(src) != _stage(mod) or src == "attn_audit":
                bad.append(f"{mod} re-exports {src}.{name}")
    assert not bad, bad


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path ``a -> b -> ... -> a``, or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_no_import_cycle_between_stages() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        for target_mod, name in _imports(path):
            a, b = _stage(mod), _stage(_target(target_mod, name, modules))
            if a != b and b != "__init__":  # attn_audit/__init__ only holds __version__ and lazy names
                graph[a].add(b)
    assert not _find_cycle(graph), " -> ".join(_find_cycle(graph))
    assert _find_cycle({"result": {"report"}, "report": {"formatting"}, "formatting": {"result"}}) == [
        "formatting", "result", "report", "formatting"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) == []


def test_torch_only_in_the_torch_stages() -> None:
    """Static: analysis and rendering never name torch, not even in a function. Dynamic: importing
    every module outside the torch stages leaves torch unloaded."""
    modules = _modules()
    light = sorted(m for m in modules if _stage(m) not in TORCH_STAGES | ORCHESTRATION)
    bad = []
    for mod in light:
        for node in ast.walk(ast.parse(modules[mod].read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch" or n.startswith("torch.") for n in names):
                bad.append(mod)
    assert not bad, bad
    code = "import sys, importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('torch' in sys.modules)\n" % (
        light + [f"attn_audit.{m}" for m in sorted(ORCHESTRATION - {"__main__"})])
    out = run_python(code)
    assert out.stdout.strip() == "False", out.stderr


def test_rules_see_a_violation(tmp_path: Path) -> None:
    """The checks above are not vacuous: a private import across packages and a cycle are found."""
    src = tmp_path / "m.py"
    src.write_text("from attn_audit.stats.verdict import _nanmax\ndef f():\n    import attn_audit.rank\n")
    assert ("attn_audit.stats.verdict", "_nanmax") in _imports(src)
    assert ("attn_audit.rank", None) in _imports(src)
    assert sys.modules["attn_audit"].__file__
