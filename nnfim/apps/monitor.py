"""Watch the Fisher during training: a callback for any training loop."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnfim.analysis.hessian import LOSSES, batch_loss
from nnfim.analysis.spectrum import fim_spectrum

__all__ = ["Run", "TrainingMonitor", "load_run"]

FORMAT = "nnfim.run"
FORMAT_VERSION = 1
STEP_KEYS = ("iteration", "loss")
RECORD_KEYS = (
    "iteration",
    "lr",
    "batch_size",
    "grad_norm",
    "condition_number",
    "condition_number_avg",
    "rank",
    "lambda_max",
    "seconds",
)
EPOCH_KEYS = (
    "epoch",
    "iteration",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "epoch_seconds",
    "monitor_seconds",
)


@dataclass
class Run:
    """A recorded run, as :meth:`TrainingMonitor.save` writes it.

    Attributes:
        steps: every ``step`` call: ``iteration`` and ``loss`` (NaN when not
            given), arrays ``(n_steps,)``.
        records: every ``every``-th step: ``iteration``, ``lr``,
            ``batch_size``, ``grad_norm``, ``condition_number`` (nonzero
            eigenvalues), ``condition_number_avg`` (its running average),
            ``rank``, ``lambda_max`` and ``seconds`` (the monitor's cost),
            arrays ``(n_records,)``.
        eigenvalues: ``(n_records, K b_max)`` every eigenvalue of each
            recorded mini-batch Fisher, descending, NaN-padded for smaller batches.
        epochs: per epoch ``train_loss``, ``train_acc``, ``test_loss``,
            ``test_acc`` (NaN when not measured), ``epoch_seconds``,
            ``monitor_seconds``, ``iteration``, arrays ``(n_epochs,)``.
        meta: settings and user metadata (JSON).
    """

    steps: dict[str, np.ndarray]
    records: dict[str, np.ndarray]
    eigenvalues: np.ndarray
    epochs: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """A short name: ``meta["label"]`` or the learning rate and batch size."""
        if "label" in self.meta:
            return str(self.meta["label"])
        parts = [f"{k}={self.meta[k]}" for k in ("lr", "batch_size") if k in self.meta]
        return ", ".join(parts) or "run"


class TrainingMonitor:
    """Records the mini-batch Fisher spectrum and training curves.

    Call :meth:`step` once per iteration, after ``loss.backward()`` (the
    gradient norm is read from ``.grad``), and :meth:`epoch` at the end of
    each epoch. Every ``every`` steps it computes all eigenvalues of the
    Fisher of the current mini-batch through its Gram dual
    (:func:`~nnfim.analysis.fim_spectrum`: ``K b`` eigenvalues for a batch of
    ``b`` examples and ``K`` output directions, whatever the number of
    parameters), their condition number over the nonzero ones and a running
    average of it. Nothing of the model is changed. A BatchNorm in train
    mode is refused, as by :func:`~nnfim.FIM` (it couples the examples).

    Args:
        every: record the spectrum every ``every`` steps (the first step included).
        variant: the Fisher's variant (see :func:`~nnfim.FIM`); also the loss
            :meth:`epoch` evaluates.
        fisher_type: ``"exact"``, ``"mc"`` or ``"empirical"``.
        max_examples: use at most this many examples of each batch for the
            spectrum (cost grows as ``(K b)^3``); ``None``: the whole batch.
        avg: weight of the past in the running average
            ``avg_t = avg * avg_{t-1} + (1 - avg) * cond_t`` (bias-corrected).
        rtol: the zero threshold of the condition number (see
            :func:`~nnfim.linalg.nonzero_condition_number`).
        metadata: JSON-serialisable settings saved with the run (``lr``,
            ``batch_size``, ``label``, ...).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = TrainingMonitor(every=2)
    >>> for it in range(4):
    ...     batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    ...     loss.backward()
    ...     _ = monitor.step(model, batch, loss=loss, optimizer=opt)
    ...     opt.step()
    >>> monitor.eigenvalues().shape  # 2 records of 3 classes x 8 examples
    (2, 24)
    """

    def __init__(
        self,
        every: int = 1,
        *,
        variant: str = "classif_logits",
        fisher_type: str = "exact",
        max_examples: int | None = None,
        avg: float = 0.9,
        rtol: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"TrainingMonitor: every must be a positive int, got {every!r}."
            )
        if max_examples is not None and (
            not isinstance(max_examples, int) or max_examples < 1
        ):
            raise ValueError(
                f"TrainingMonitor: max_examples must be a positive int or None, got "
                f"{max_examples!r}."
            )
        if not 0 <= avg < 1:
            raise ValueError(f"TrainingMonitor: avg must lie in [0, 1), got {avg!r}.")
        self.every = every
        self.variant = variant
        self.fisher_type = fisher_type
        self.max_examples = max_examples
        self.avg = avg
        self.rtol = rtol
        self.metadata = dict(metadata or {})
        self.iteration = 0
        self._steps: dict[str, list[float]] = {k: [] for k in STEP_KEYS}
        self._records: dict[str, list[float]] = {k: [] for k in RECORD_KEYS}
        self._eigenvalues: list[np.ndarray] = []
        self._epochs: dict[str, list[float]] = {k: [] for k in EPOCH_KEYS}
        self._avg_state = 0.0
        self._avg_count = 0
        self._epoch_start: float | None = None
        self._monitor_seconds = 0.0

    # -- recording ------------------------------------------------------------
    def step(
        self,
        model: nn.Module,
        batch: Any,
        *,
        loss: torch.Tensor | float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
    ) -> bool:
        """Count one iteration; every ``every`` of them record the spectrum.

        Args:
            model: the network (left untouched).
            batch: the mini-batch ``(inputs, labels, ...)`` of this iteration.
            loss: this iteration's loss (recorded for the loss curve).
            optimizer: where the learning rate is read (its first param group).
            lr: the learning rate, when there is no optimizer to read it from.

        Returns:
            Whether this step was recorded.
        """
        start = time.perf_counter()
        if self._epoch_start is None:
            self._epoch_start = start
        recorded = self.iteration % self.every == 0
        if recorded:  # first: a failure leaves nothing half-recorded
            self._record(model, batch, optimizer, lr)
        self._steps["iteration"].append(self.iteration)
        self._steps["loss"].append(
            math.nan
            if loss is None
            else float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        )
        self.iteration += 1
        spent = time.perf_counter() - start
        self._monitor_seconds += spent
        if recorded:
            self._records["seconds"].append(spent)
        return recorded

    def _record(
        self,
        model: nn.Module,
        batch: Any,
        optimizer: torch.optim.Optimizer | None,
        lr: float | None,
    ) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "TrainingMonitor.step: batch must be (inputs, labels, ...), got "
                f"{type(batch).__name__}."
            )
        batch_size = len(batch[1])
        if self.max_examples is not None:
            batch = tuple(t[: self.max_examples] for t in batch)
        spec = fim_spectrum(
            model,
            [batch],
            variant=self.variant,
            fisher_type=self.fisher_type,
            rtol=self.rtol,
            sub_batch=None,  # one mini-batch: a single batched backward is cheapest
        )
        if "rtol" not in self.metadata:  # the threshold actually used, for plots
            self.metadata["rtol"] = spec.rtol
        cond = spec.condition_number
        if math.isfinite(cond):
            self._avg_count += 1
            self._avg_state = self.avg * self._avg_state + (1 - self.avg) * cond
        avg = (
            self._avg_state / (1 - self.avg**self._avg_count)
            if self._avg_count
            else math.nan
        )
        if lr is None and optimizer is not None:
            lr = float(optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if grads
            else math.nan
        )
        rec = self._records
        rec["iteration"].append(self.iteration)
        rec["lr"].append(math.nan if lr is None else float(lr))
        rec["batch_size"].append(batch_size)
        rec["grad_norm"].append(grad_norm)
        rec["condition_number"].append(cond)
        rec["condition_number_avg"].append(avg)
        rec["rank"].append(spec.rank)
        rec["lambda_max"].append(float(spec.eigenvalues[0]))
        self._eigenvalues.append(spec.eigenvalues.cpu().numpy())

    def epoch(
        self,
        model: nn.Module | None = None,
        *,
        train: Iterable[Any] | None = None,
        test: Iterable[Any] | None = None,
        train_loss: float | None = None,
        train_acc: float | None = None,
        test_loss: float | None = None,
        test_acc: float | None = None,
    ) -> dict[str, float]:
        """Close an epoch: its time, and train/test loss and accuracy.

        Values given are recorded as they are; for a loader given
        (``train``/``test``), the mean loss of ``variant`` and the accuracy
        (argmax, or sign for ``classif_binary``) are evaluated on ``model``
        in eval mode, without gradients, and the model's modes restored.

        Returns:
            The epoch's row (NaN for what was not measured).
        """
        now = time.perf_counter()
        if (train is not None or test is not None) and model is None:
            raise ValueError("TrainingMonitor.epoch: pass model= to evaluate loaders.")
        start = time.perf_counter()
        if train is not None:
            assert model is not None
            train_loss, train_acc = evaluate(model, train, self.variant)
        if test is not None:
            assert model is not None
            test_loss, test_acc = evaluate(model, test, self.variant)
        eval_seconds = time.perf_counter() - start
        row = {
            "epoch": len(self._epochs["epoch"]),
            "iteration": self.iteration,
            "train_loss": math.nan if train_loss is None else float(train_loss),
            "train_acc": math.nan if train_acc is None else float(train_acc),
            "test_loss": math.nan if test_loss is None else float(test_loss),
            "test_acc": math.nan if test_acc is None else float(test_acc),
            "epoch_seconds": now - (self._epoch_start or now),
            "monitor_seconds": self._monitor_seconds + eval_seconds,
        }
        for k, v in row.items():
            self._epochs[k].append(v)
        self._epoch_start = time.perf_counter()
        self._monitor_seconds = 0.0
        return row

    # -- results --------------------------------------------------------------
    def eigenvalues(self) -> np.ndarray:
        """``(n_records, K b_max)``: each record's eigenvalues, descending, NaN-padded."""
        width = max((len(e) for e in self._eigenvalues), default=0)
        out = np.full((len(self._eigenvalues), width), np.nan)
        for i, e in enumerate(self._eigenvalues):
            out[i, : len(e)] = e
        return out

    def run(self) -> Run:
        """The recorded run (copies)."""
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "every": self.every,
            "variant": self.variant,
            "fisher_type": self.fisher_type,
            "max_examples": self.max_examples,
            "avg": self.avg,
            **self.metadata,
        }
        return Run(
            {k: np.asarray(v, dtype=np.float64) for k, v in self._steps.items()},
            {k: np.asarray(v, dtype=np.float64) for k, v in self._records.items()},
            self.eigenvalues(),
            {k: np.asarray(v, dtype=np.float64) for k, v in self._epochs.items()},
            meta,
        )

    def save(self, path: str | Path) -> Path:
        """Write the run into the directory ``path`` (see :func:`save_run`)."""
        return save_run(self.run(), path)


def evaluate(
    model: nn.Module, loader: Iterable[Any], variant: str = "classif_logits"
) -> tuple[float, float]:
    """Mean loss and accuracy over ``loader``, in eval mode, modes restored after.

    Returns:
        ``(loss, accuracy)``; accuracy is NaN for ``regression``.
    """
    if variant not in LOSSES:
        raise ValueError(
            f"evaluate: unknown variant {variant!r}; choose one of {LOSSES}."
        )
    modes = {m: m.training for m in model.modules()}
    total = correct = 0.0
    n = 0
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                out = model(x)
                total += float(batch_loss(variant, out, y))
                if variant == "classif_binary":
                    hit = (out > 0) == (y.reshape(out.shape) > 0.5)
                    correct += float(hit.float().reshape(len(y), -1).mean(1).sum())
                elif variant != "regression":
                    correct += float((out.argmax(-1) == y).sum())
                n += len(y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise ValueError("evaluate: the loader yielded no examples.")
    return total / n, (math.nan if variant == "regression" else correct / n)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run(run: Run, path: str | Path) -> Path:
    """Write ``run`` into the directory ``path``: ``run.npz`` + ``run.json`` (+ ``run.mat``).

    ``run.npz`` holds plain arrays (read with ``allow_pickle=False``),
    ``run.json`` the metadata, and ``run.mat`` the same arrays for MATLAB when
    scipy is installed. Each file is written to a temporary name and renamed.

    Returns:
        The directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"eigenvalues": run.eigenvalues}
    arrays.update({f"step_{k}": v for k, v in run.steps.items()})
    arrays.update({f"record_{k}": v for k, v in run.records.items()})
    arrays.update({f"epoch_{k}": v for k, v in run.epochs.items()})

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    _atomic_write(out / "run.npz", write_npz)
    meta = {**run.meta, "arrays": sorted(arrays)}
    _atomic_write(
        out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2))
    )
    try:
        from scipy.io import savemat
    except ImportError:
        pass
    else:
        _atomic_write(out / "run.mat", lambda tmp: savemat(tmp, arrays, format="5"))
    return out


def load_run(path: str | Path) -> Run:
    """Read a run written by :meth:`TrainingMonitor.save` (no pickle is loaded).

    Args:
        path: the run directory (or its ``run.json`` / ``run.npz``).

    Returns:
        The :class:`Run`.

    Raises:
        ValueError: a missing, unreadable or malformed run, saying which file.
    """
    p = Path(path)
    folder = p.parent if p.name in ("run.json", "run.npz") else p
    meta_path, npz_path = folder / "run.json", folder / "run.npz"
    for f in (meta_path, npz_path):
        if not f.is_file():
            raise ValueError(f"{folder}: not an nnfim run ({f.name} is missing).")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: unreadable run metadata ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not an nnfim run (no {FORMAT!r} header).")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: run format version {meta.get('version')!r}, this nnfim "
            f"reads version {FORMAT_VERSION}."
        )
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # numpy raises several types for a corrupt archive
        raise ValueError(f"{npz_path}: unreadable run arrays ({err}).") from err
    needed = (
        ["eigenvalues"]
        + [f"step_{k}" for k in STEP_KEYS]
        + [f"record_{k}" for k in RECORD_KEYS]
        + [f"epoch_{k}" for k in EPOCH_KEYS]
    )
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise ValueError(f"{npz_path}: malformed run (missing arrays {missing}).")
    meta.pop("arrays", None)
    return Run(
        {k: arrays[f"step_{k}"] for k in STEP_KEYS},
        {k: arrays[f"record_{k}"] for k in RECORD_KEYS},
        arrays["eigenvalues"],
        {k: arrays[f"epoch_{k}"] for k in EPOCH_KEYS},
        meta,
    )
