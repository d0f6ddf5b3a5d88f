"""dpspeed: differentially private training of PyTorch models at the cost of non-private training.

The names below are imported on first use, so that the command line's help answers without
loading torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import PrivacyEngine
    from .fix import fix_model, validate
    from .integrations.opacus import BatchMemoryManager, ModuleValidator
    from .layers import LayerRule, register_rule

#: exported name -> the module that defines it
_EXPORTS = {
    "PrivacyEngine": "engine",
    "fix_model": "fix",
    "validate": "fix",
    "LayerRule": "layers",
    "register_rule": "layers",
    "BatchMemoryManager": "integrations.opacus",
    "ModuleValidator": "integrations.opacus",
}
__all__ = ["PrivacyEngine", "fix_model", "validate", "LayerRule", "register_rule", "BatchMemoryManager",
           "ModuleValidator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpspeed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
