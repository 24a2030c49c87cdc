"""Matrix-free linear algebra used by the representations."""

from nnfim.linalg.cg import cg

__all__ = ["cg"]
