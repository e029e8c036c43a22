"""sqllm: squeeze large language models to 2-4 bits per weight, and run them.

Importing sqllm registers its checkpoint format with transformers, so that
``AutoModelForCausalLM.from_pretrained(folder)`` reads packed sqllm checkpoints. The registration waits
until transformers' quantizer registry is itself imported, so that ``import sqllm.quant.kmeans`` (or any
other pure part of sqllm) does not pay for importing transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_REGISTRY_MODULE = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    try:
        from .hf import register
    except ImportError:  # an older transformers without the quantizer registry
        return
    register()


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_with_transformers` right after transformers' quantizer registry loads."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not find this finder again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _REGISTRY_MODULE in sys.modules:
    _register_with_transformers()
else:
    sys.meta_path.insert(0, _RegisterWhenImported())
