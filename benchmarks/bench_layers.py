"""Layer coverage: the small transformer and the fallback's overhead, from the suite.

``python -m benchmarks.bench_layers [options]`` is ``python -m benchmarks
--only 'lm_*' 'fallback_diag/*' [options]``: the transformer of the
layer-coverage issue (MC diagonal, MC K-FAC without the tied embedding,
per-example gradients) and the exact diagonal of the MLP whose middle layer
goes through the ``torch.func`` fallback (compare its ``x floor`` with
``mlp_diag``'s).
"""

from __future__ import annotations

import sys

from benchmarks.__main__ import main as suite_main

GROUPS = ("lm_*", "fallback_diag/*")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return suite_main(["--only", *GROUPS, *args])


if __name__ == "__main__":
    sys.exit(main())
