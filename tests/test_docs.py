"""The documentation covers every public name, and its pages are all reachable."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import nnfim

DOCS = Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(
    r"^\.\. (auto(?:class|function|data|module)|py:(?:data|class|function))::\s+(\S+)",
    re.MULTILINE,
)


def _public_modules() -> list[ModuleType]:
    """``nnfim`` and its direct public submodules that declare ``__all__``."""
    mods = [nnfim]
    for info in pkgutil.iter_modules(nnfim.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"nnfim.{info.name}")
        if hasattr(mod, "__all__"):
            mods.append(mod)
    return mods


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _documented() -> tuple[set[int], set[str]]:
    """Ids of the objects the API page documents, and the modules it automodules."""
    text = (DOCS / "api.md").read_text()
    objects, modules = set(), set()
    for kind, target in DIRECTIVE.findall(text):
        if kind == "automodule":
            modules.add(target)
            mod = importlib.import_module(target)
            objects |= {id(getattr(mod, n)) for n in mod.__all__}
        else:
            objects.add(id(_resolve(target)))
    return objects, modules


PUBLIC = sorted(
    {(m.__name__, n) for m in _public_modules() for n in m.__all__},
)


@pytest.mark.parametrize(("module", "name"), PUBLIC)
def test_public_name_is_in_the_api_reference(module: str, name: str) -> None:
    objects, _ = _documented()
    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, ModuleType):
        pytest.skip("a submodule, documented by its own names")
    assert id(obj) in objects, (
        f"{module}.{name} is public (in __all__) but docs/api.md does not document "
        "it: add an autoclass/autofunction/py:data entry."
    )


def test_api_entries_resolve() -> None:
    text = (DOCS / "api.md").read_text()
    for kind, target in DIRECTIVE.findall(text):
        if kind == "automodule":
            importlib.import_module(target)
        else:
            _resolve(target)


def test_every_page_is_in_a_toctree() -> None:
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    tree = set()
    for page in DOCS.glob("*.md"):
        for block in re.findall(r"```\{toctree\}(.*?)```", page.read_text(), re.S):
            tree |= {
                line.strip()
                for line in block.splitlines()
                if line.strip() and not line.strip().startswith(":")
            }
    missing = sorted(pages - tree)
    assert not missing, (
        f"docs pages in no toctree (add them to docs/index.md): {missing}"
    )


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_literalincludes_exist(page: str) -> None:
    text = (DOCS / page).read_text()
    for target in re.findall(r"```\{(?:literalinclude|include)\}\s+(\S+)", text):
        assert (DOCS / target).is_file(), f"{page} includes {target}, which is missing"
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (DOCS / target).is_file(), f"{page} shows {target}, which is missing"
