"""Structured matrices (K-FAC, EKFAC, NTK) against the peers: a subset of the suite.

``python -m benchmarks.bench_structured [options]`` is ``python -m benchmarks
--only 'mlp_kfac/*' 'mlp_ekfac/*' 'cnn_kfac/*' 'ntk/*' [options]``; every
option of ``python -m benchmarks`` applies (``--only`` replaces the subset).
"""

from __future__ import annotations

import sys

from benchmarks.__main__ import main as suite_main

GROUPS = ("mlp_kfac/*", "mlp_ekfac/*", "cnn_kfac/*", "ntk/*")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return suite_main(["--only", *GROUPS, *args])


if __name__ == "__main__":
    sys.exit(main())
