"""Shared command line of the documentation examples (not an example itself).

Every ``docs/examples/NAME.py`` runs as ``python docs/examples/NAME.py [--quick]
[--out DIR]``: ``--quick`` is the small setting the tests run (under ~20 s on
2 cores), ``--out`` the folder for outputs (default ``runs/examples/NAME``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(name: str, doc: str | None) -> argparse.Namespace:
    """``--quick`` and ``--out`` (created), the convention of every example."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast setting")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/examples") / name,
        help="folder for the outputs (default: runs/examples/%(default)s)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args
