"""Optional progress bars over data loaders (tqdm when installed, else nothing)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], enabled: bool, desc: str = "nnfim"
) -> Iterator[T]:
    """Iterate over ``iterable``, showing a tqdm bar on stderr when asked and possible.

    Without tqdm installed, or with ``enabled=False``, it iterates silently:
    a progress bar is a convenience, never a reason to fail.

    Args:
        iterable: the loader (its ``len``, when it has one, sets the total).
        enabled: whether to show a bar.
        desc: the bar's label.

    Yields:
        The items of ``iterable``, unchanged.

    >>> list(progress_bar([1, 2], enabled=False))
    [1, 2]
    """
    bar: Any = None
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            bar = None
        else:
            bar = tqdm(iterable, desc=desc, unit="batch", file=sys.stderr)
    if bar is None:
        yield from iterable
        return
    try:
        yield from bar
    finally:
        bar.close()
