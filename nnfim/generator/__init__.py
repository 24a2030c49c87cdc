"""The generator: hooks, output-space variants and per-layer rules."""

from nnfim.generator.jacobian import FISHER_TYPES, Generator
from nnfim.generator.rules import LayerRule, find_rule, register_rule, registered_types
from nnfim.generator.variants import VARIANTS

__all__ = [
    "FISHER_TYPES",
    "VARIANTS",
    "Generator",
    "LayerRule",
    "find_rule",
    "register_rule",
    "registered_types",
]
