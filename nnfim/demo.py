"""``python -m nnfim.demo``: the same as ``nnfim demo`` (see :mod:`nnfim.cli`).

Kept for the ``load_digits_data`` import and the old module entry point; the
data now live in :mod:`nnfim.data` and the demo in :func:`nnfim.cli.demo`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nnfim.data import batches, load_digits_data

__all__ = ["batches", "load_digits_data", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nnfim demo`` with ``argv`` (``--out``, ``--quick``); returns the exit status."""
    from nnfim.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
