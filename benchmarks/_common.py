"""Pieces shared by the benchmark scripts: tables and the end of a run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


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


def floor_c(
    model: nn.Module, batches: Iterable[Any], outputs: int
) -> Callable[[], None]:
    """The floor: per batch one forward, then one backward to the parameters per output."""
    params = [p for p in model.parameters() if p.requires_grad]
    eye = torch.eye(outputs)

    def run() -> None:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            out = model(x)
            for c in range(outputs):
                torch.autograd.grad(
                    out, params, eye[c].expand_as(out), retain_graph=True
                )

    return run
