"""Per-layer rules, one file per layer type, and their public registry."""

from nnfim.generator.rules import (  # noqa: F401  (registration)
    attention,
    conv,
    conv_transpose,
    embedding,
    linear,
    norm,
)
from nnfim.generator.rules._registry import (
    LayerRule,
    find_rule,
    register_rule,
    registered_types,
)

__all__ = ["LayerRule", "find_rule", "register_rule", "registered_types"]
