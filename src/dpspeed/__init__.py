"""dpspeed: differentially private training of PyTorch models at the cost of non-private training."""

from .engine import PrivacyEngine
from .fix import fix_model, validate
from .integrations.opacus import BatchMemoryManager, ModuleValidator
from .layers import LayerRule, register_rule

__all__ = ["PrivacyEngine", "fix_model", "validate", "LayerRule", "register_rule", "BatchMemoryManager",
           "ModuleValidator"]
__version__ = "0.1.0"
