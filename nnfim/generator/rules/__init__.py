"""Per-layer rules, one file per layer type, and their public registry."""

from nnfim.generator.rules import conv, linear, norm  # noqa: F401  (registration)
from nnfim.generator.rules._registry import (
    LayerRule,
    find_rule,
    register_rule,
    registered_types,
)

__all__ = ["LayerRule", "find_rule", "register_rule", "registered_types"]
