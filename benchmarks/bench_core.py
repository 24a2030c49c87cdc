"""The MLP's core quantities (exact and MC diagonal, implicit mv): a subset of the suite.

``python -m benchmarks.bench_core [options]`` is ``python -m benchmarks --only
'mlp_diag/*' 'mlp_mc_diag/*' 'mlp_mv/*' [options]``. It needs no peer: from
``.venv`` the peers are reported "not installed" and nnfim is compared with
``torch.func`` and the floor.
"""

from __future__ import annotations

import sys

from benchmarks.__main__ import main as suite_main

GROUPS = ("mlp_diag/*", "mlp_mc_diag/*", "mlp_mv/*")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return suite_main(["--only", *GROUPS, *args])


if __name__ == "__main__":
    sys.exit(main())
