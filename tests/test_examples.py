"""Every documentation example runs (``--quick``) and writes under ``--out``.

Examples live in ``docs/examples/NAME.py`` and follow one command line:
``python docs/examples/NAME.py [--quick] [--out DIR]``. Files starting with
``_`` are helpers, not examples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "docs" / "examples"
EXAMPLES = sorted(
    p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_")
)
TIMEOUT_S = 180


def test_examples_exist() -> None:
    assert "quickstart.py" in EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), "--quick", "--out", str(out)],
        cwd=EXAMPLES_DIR.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{name} --quick exited with {proc.returncode}\n--- stderr ---\n"
            f"{proc.stderr[-4000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
        )
    assert proc.stdout.strip(), f"{name} printed nothing"
    assert out.is_dir(), f"{name} did not create its --out folder"
