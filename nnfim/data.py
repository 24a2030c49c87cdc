"""Built-in data: the digits images scikit-learn ships, or a synthetic stand-in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DATASETS", "Dataset", "batches", "load_dataset", "load_digits_data"]

DATASETS = ("digits", "synthetic")


def _synthetic(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten Gaussian clusters in 64 dimensions, the digits' shape."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 64, generator=gen, dtype=torch.float32)
    y = torch.randint(0, 10, (1797,), generator=gen)
    x = centers[y] + 0.8 * torch.randn(1797, 64, generator=gen, dtype=torch.float32)
    return x, y


def load_digits_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Digits images ``(1797, 64)`` standardised, labels ``(1797,)``, and the source.

    The 8x8 digits that scikit-learn ships (nothing is downloaded); without
    scikit-learn, a synthetic set of the same shape seeded by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x, y = _synthetic(seed)
        return x, y, "synthetic (scikit-learn not installed)"
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target), "scikit-learn digits"


@dataclass
class Dataset:
    """A train/test split of 8x8 single-channel images.

    Attributes:
        x_train: ``(n_train, 1, 8, 8)`` float32.
        y_train: ``(n_train,)`` labels.
        x_test: ``(n_test, 1, 8, 8)``.
        y_test: ``(n_test,)``.
        n_classes: 10.
        source: where the data came from.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    source: str

    def to(self, dtype: torch.dtype) -> Dataset:
        """The same data with images of ``dtype`` (labels unchanged)."""
        return Dataset(
            self.x_train.to(dtype),
            self.y_train,
            self.x_test.to(dtype),
            self.y_test,
            self.n_classes,
            self.source,
        )


def load_dataset(
    name: str = "digits", seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """A built-in dataset, shuffled by ``seed`` and split.

    Args:
        name: ``"digits"`` (scikit-learn's, or synthetic when it is absent)
            or ``"synthetic"``.
        seed: seed of the shuffle (and of the synthetic data).
        test_fraction: share of the examples held out.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: an unknown name or a bad fraction.

    >>> load_dataset("synthetic").x_train.shape
    torch.Size([1438, 1, 8, 8])
    """
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}."
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
    if name == "digits":
        x, y, source = load_digits_data(seed)
    else:
        x, y = _synthetic(seed)
        source = "synthetic"
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].reshape(-1, 1, 8, 8), y[perm]
    n_test = int(round(len(x) * test_fraction))
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10, source)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``size`` (the last may be smaller), shuffled when a generator is given.

    A list, so the Fisher can read it several times in the same order.
    """
    if generator is not None:
        order = torch.randperm(len(x), generator=generator)
        x, y = x[order], y[order]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
