"""``python -m nnfim``: the ``nnfim`` command."""

from nnfim.cli import main

raise SystemExit(main())
