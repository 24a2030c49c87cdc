"""Pieces shared by the benchmark scripts: tables and the end of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def markdown(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def finish(
    info: dict[str, Any], result: dict[str, Any], out: Path, threads: int
) -> None:
    """Print the load average over the run and write the JSON results."""
    start, end = info["loadavg_start"][0], info["loadavg_end"][0]
    print(
        f"\n1-min load average: {start:.2f} before the run, {end:.2f} at its end "
        f"({os.cpu_count()} CPUs; this run alone accounts for up to {threads})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": info, **result}, indent=2) + "\n")
    print(f"\nwrote {out}")
