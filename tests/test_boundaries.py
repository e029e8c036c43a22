"""The package's separations (../shared/DESIGN.md), read from the source's import statements.

Every import of every module under ``src/sqllm`` is resolved to an absolute module name (relative
imports included, function-level imports included) and checked against the table below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "sqllm"

# package (dotted, relative to sqllm) -> (sqllm packages/modules it may import, outside packages it never imports)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "quant": ({"codes", "config", "errors", "quant"}, {"transformers", "tqdm", "safetensors", "accelerate"}),
    "formats": ({"codes", "errors", "formats"}, {"transformers", "tqdm", "accelerate"}),
    "engine": ({"quant", "codes", "config", "errors", "methods", "models", "data", "engine"}, set()),
    "nn": ({"formats", "codes", "errors", "nn"}, set()),
    "cli": ({"api", "errors", "report"}, set()),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file; ``from . import x`` yields ``pkg.x``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None:  # ``from . import a, b``: each name is a module or a package attribute
                found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, mod))
    return found


def _owner(module: str) -> str | None:
    """The RULES key a module of sqllm falls under."""
    rel = module.removeprefix("sqllm.")
    for key in RULES:
        if rel == key or rel.startswith(key + "."):
            return key
    return None


def _internal_target(module: str) -> str | None:
    """For an import of sqllm's own code: the first component below ``sqllm`` (``quant``, ``api``, ...)."""
    if module == "sqllm" or not module.startswith("sqllm."):
        return None
    return module.split(".")[1]


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        owner = _owner(_module_name(path))
        if owner is None:
            continue
        allowed, banned = RULES[owner]
        for line, mod in _imports(path):
            target = _internal_target(mod)
            where = f"{path.relative_to(SRC)}:{line} imports {mod}"
            if target is not None and target not in allowed:
                bad.append(f"{where} ({owner}/ may import only {sorted(allowed)})")
            if mod.split(".")[0] in banned:
                bad.append(f"{where} ({owner}/ never imports {mod.split('.')[0]})")
    return bad


def test_no_import_crosses_the_rules():
    assert violations() == []


def test_the_checker_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    """The checker itself: a planted bad import (relative, inside a function) is reported."""
    fake = tmp_path / "sqllm" / "quant"
    fake.mkdir(parents=True)
    (tmp_path / "sqllm" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from ..engine.loop import x\n    import transformers\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "sqllm")
    found = violations()
    assert any("imports sqllm.engine.loop" in v for v in found)
    assert any("never imports transformers" in v for v in found)


@pytest.mark.parametrize("module", ["sqllm.quant.kmeans", "sqllm.quant.gptq", "sqllm.formats.layouts"])
def test_lean_imports(module):
    """The per-matrix math and the format load without transformers, accelerate, Triton or vLLM (torch
    itself imports tqdm, so that one cannot be checked here; the rule above keeps quant/ from using it)."""
    code = (f"import sys, {module}; heavy = [m for m in ('transformers', 'accelerate', 'triton', 'vllm') "
            f"if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr
