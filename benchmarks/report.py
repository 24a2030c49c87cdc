"""The suite's report: the machine, the markdown table, the JSON file."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from benchmarks import workloads
from benchmarks._common import markdown
from benchmarks.suite import AGREE_RTOL, NOISY_SPREAD, Case
from benchmarks.workloads import describe

#: import name -> distribution name of every library the suite may time
LIBRARIES = {
    "nnfim": "nnfim",
    "nngeometry": "nngeometry",
    "backpack": "backpack-for-pytorch",
    "curvlinops": "curvlinops-for-pytorch",
}
#: markers of the generated part of a docs page (``--docs``)
DOCS_START, DOCS_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _cpu_model() -> str | None:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def nnfim_source() -> dict[str, Any]:
    """Where the children import nnfim from, and its git state.

    nnfim may change while a run lasts (another checkout, an editable
    install): the report compares this at the start and at the end.
    """
    import nnfim

    path = Path(nnfim.__file__).resolve().parent

    def git(*args: str) -> str | None:
        done = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True
        )
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".")
    return {
        "path": str(path),
        "commit": git("rev-parse", "HEAD"),
        # the package's own tree: commits elsewhere in the repository do not count
        "tree": git("rev-parse", "HEAD:./"),
        "dirty": None if status is None else bool(status),
        "diff_sha1": hashlib.sha1(
            (git("diff", "HEAD", "--", ".") or "").encode()
        ).hexdigest()[:12],
    }


def meta(rounds: int, inner: int, quick: bool) -> dict[str, Any]:
    """The machine, the versions, the date and the settings of this run."""
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for mod, dist in LIBRARIES.items():
        try:
            versions[mod] = version(dist)
        except PackageNotFoundError:
            versions[mod] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "versions": versions,
        "nnfim_source": nnfim_source(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": workloads.THREADS,
        "dtype": "float32",
        "rounds": rounds,
        "inner": inner,
        "quick": quick,
        "loadavg_start": os.getloadavg(),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _agreement_cell(row: dict[str, Any], note: str) -> str:
    err = row.get("relative_error")
    if err is None:
        return note if row["lib"] != "floor" and row["median_s"] is not None else "-"
    flag = "" if row.get("agrees", True) else " **DISAGREES**"
    against = "" if row["against"] == "nnfim" else f" (vs {row['against']})"
    return f"{err:.1e}{flag}{against}"


def _status_cell(row: dict[str, Any]) -> str:
    status = row["status"]
    by_min = row.get("status_min", status)
    cell = status if by_min == status else f"{status} (min: {by_min})"
    mem = row.get("ratio_peak_best_peer")
    if status != "-" and mem is not None and mem > 1.0:
        cell += f"; memory {mem:.2f} x best peer"
    return cell


def table(cases: list[Case], rows: list[dict[str, Any]]) -> str:
    """One markdown table: a block of rows per group."""
    by_name = {c.name: c for c in cases}
    lines = []
    for row in rows:
        case = by_name[row["case"]]
        group = case.group
        first = row is next(r for r in rows if r["group"] == row["group"])
        label = f"**{group.name}**: {group.description}" if first else ""
        if not row["installed"]:
            lines.append([label, row["lib"], "not installed"] + ["-"] * 6)
            continue
        if row["error"] is not None:
            last = row["error"].strip().splitlines()[-1][:80].replace("|", "/")
            lines.append([label, row["lib"], f"failed: {last}"] + ["-"] * 6)
            continue
        noisy = " NOISY" if (row.get("spread") or 0.0) > NOISY_SPREAD else ""
        lines.append(
            [
                label,
                row["lib"],
                _fmt(row["median_s"], ".4f") + noisy,
                _fmt(row["peak_mib"], ".0f"),
                _fmt(row["ratio_floor"], ".2f"),
                _fmt(row["ratio_fastest_peer"], ".2f"),
                _agreement_cell(row, group.agreement_note or "-"),
                row["target"] or "-",
                _status_cell(row),
            ]
        )
    headers = [
        "group",
        "library",
        "median s",
        "peak MiB",
        "x floor",
        "x fastest peer",
        "rel. err (vs nnfim)",
        "target (nnfim)",
        "pass/fail",
    ]
    return markdown(headers, lines)


def machine_line(info: dict[str, Any]) -> str:
    versions = ", ".join(
        f"{k} {v or 'not installed'}" for k, v in info["versions"].items()
    )
    load = info["loadavg_start"][0], info.get("loadavg_end", [float("nan")])[0]
    return (
        f"{info['date']}; {info['cpu']} ({info['cpu_count']} CPUs), {info['platform']}, "
        f"Python {info['python']}; {versions}; float32, {info['threads']} threads; "
        f"{info['rounds']} round(s) x {info['inner']} timed run(s) per case after a "
        f"warm-up and a peak-memory run, one fresh process per case and round "
        f"(each first allocates and frees 24 MiB: the same heap thresholds for all)"
        + (", --quick (reduced data)" if info["quick"] else "")
        + f"; 1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end."
    )


def render(info: dict[str, Any], cases: list[Case], rows: list[dict[str, Any]]) -> str:
    """The markdown report: machine, table, flags."""
    parts = [machine_line(info), "", table(cases, rows), ""]
    bad = [r["case"] for r in rows if r.get("agrees") is False]
    if bad:
        parts.append(
            f"DISAGREES (relative error above the group's tolerance, {AGREE_RTOL} "
            f"unless stated): {', '.join(bad)}."
        )
    noisy = [r["case"] for r in rows if (r.get("spread") or 0.0) > NOISY_SPREAD]
    if noisy:
        parts.append(
            f"NOISY (slowest run > {NOISY_SPREAD} x fastest): {', '.join(noisy)}; "
            "something else competed for the CPUs: compare the ratios of minimums "
            "in the JSON file, or re-run on a quiet machine."
        )
    failed = [r["case"] for r in rows if r["error"] is not None]
    if failed:
        parts.append(f"Failed (error in the JSON file): {', '.join(failed)}.")
    if changed(info):
        parts.append(
            "WARNING: nnfim's source changed during the run; the cases may have "
            "measured different code. Re-run."
        )
    workloads = sorted({c.group.workload for c in cases})
    parts.append(
        "\nWorkloads: "
        + "; ".join(f"`{k}`: {describe(k, info['quick'])}" for k in workloads)
        + "."
    )
    return "\n".join(parts) + "\n"


def changed(info: dict[str, Any]) -> bool:
    """Whether nnfim's source differed between the start and the end of the run."""
    end = info.get("nnfim_source_end")
    if end is None:
        return False
    keys = ("path", "tree", "dirty", "diff_sha1")
    return any(end[k] != info["nnfim_source"][k] for k in keys)


def write(
    out: Path,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    text: str,
    agree: dict[str, Any],
) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(
        json.dumps({"meta": info, "summary": rows, "agreement": agree}, indent=2) + "\n"
    )
    md.write_text(text)
    return js, md


def update_docs(path: Path, text: str) -> None:
    """Replace the part of ``path`` between the bench markers with ``text``."""
    page = path.read_text()
    if DOCS_START not in page or DOCS_END not in page:
        raise ValueError(f"{path} has no {DOCS_START} ... {DOCS_END} section.")
    head, rest = page.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{text}{DOCS_END}{tail}")
