"""TrainingMonitor: what it records is the Gram-dual spectrum; files round-trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, model_state
from torch import nn

from nnfim.apps import TrainingMonitor, load_run, save_run
from nnfim.apps.monitor import evaluate
from nnfim.testing import reference_fisher


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def tiny_batches(sizes=(8, 8, 5, 8)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for n in sizes
    ]


def train(monitor: TrainingMonitor, model: nn.Module, data, epochs: int = 2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    for _ in range(epochs):
        for xb, yb in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            state = model_state(model)
            if monitor.step(model, (xb, yb), loss=loss, optimizer=opt):
                snapshots.append(
                    (
                        reference_fisher(model, [(xb, yb)]),
                        torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                        len(yb),
                    )
                )
            assert_same_state(state, model_state(model))
            opt.step()
        monitor.epoch(model, train=data, test=data[:1])
    return snapshots


@pytest.mark.parametrize("every", [1, 3])
def test_records_are_the_minibatch_fisher_spectrum(every: int) -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = TrainingMonitor(every=every, metadata={"lr": 0.1, "batch_size": 8})
    snapshots = train(monitor, model, data)
    run = monitor.run()
    n_steps = 2 * len(data)
    assert len(run.steps["iteration"]) == n_steps
    assert run.records["iteration"].tolist() == list(range(0, n_steps, every))
    assert len(snapshots) == len(run.records["iteration"])
    assert run.eigenvalues.shape == (len(snapshots), 3 * 8)
    for i, (fisher, grad, n) in enumerate(snapshots):
        ref = torch.linalg.eigvalsh(fisher).flip(0)
        rank = int((ref > 1e-10 * ref[0]).sum())
        got = run.eigenvalues[i]
        assert np.isnan(got[3 * n :]).all()  # padding for the smaller batch
        np.testing.assert_allclose(
            got[:rank], ref[:rank].numpy(), rtol=1e-7, atol=1e-12
        )
        assert run.records["rank"][i] == rank
        cond = float(ref[0] / ref[rank - 1])
        assert run.records["condition_number"][i] == pytest.approx(cond, rel=1e-6)
        assert run.records["grad_norm"][i] == pytest.approx(float(grad.norm()))
        assert run.records["batch_size"][i] == n
        assert run.records["lr"][i] == pytest.approx(0.1)
        assert run.records["seconds"][i] > 0
    # bias-corrected running average of the condition number
    conds = run.records["condition_number"]
    weights = 0.9 ** np.arange(len(conds))[::-1]
    expected = (weights * conds).sum() / weights.sum()
    assert run.records["condition_number_avg"][-1] == pytest.approx(expected)
    assert run.records["condition_number_avg"][0] == pytest.approx(conds[0])


def test_epoch_rows_match_direct_evaluation() -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = TrainingMonitor(every=2)
    train(monitor, model, data, epochs=1)
    run = monitor.run()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        out = model(x)
    assert run.epochs["train_loss"][0] == pytest.approx(float(F.cross_entropy(out, y)))
    acc = float((out.argmax(1) == y).double().mean())
    assert run.epochs["train_acc"][0] == pytest.approx(acc)
    assert run.epochs["iteration"][0] == len(data)
    assert run.epochs["epoch_seconds"][0] > 0
    assert run.epochs["monitor_seconds"][0] > 0


def test_evaluate_restores_modes() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    model[2].eval()
    before = model_state(model)
    evaluate(model, tiny_batches())
    assert_same_state(before, model_state(model))


def test_values_given_directly_and_nan_when_missing() -> None:
    monitor = TrainingMonitor()
    row = monitor.epoch(train_loss=1.5, test_acc=0.5)
    assert row["train_loss"] == 1.5 and row["test_acc"] == 0.5
    assert math.isnan(row["train_acc"]) and math.isnan(row["test_loss"])


@pytest.mark.parametrize("with_scipy", [True, False])
def test_files_round_trip(tmp_path, monkeypatch, with_scipy: bool) -> None:
    if with_scipy:
        pytest.importorskip("scipy")
    else:
        import builtins

        real_import = builtins.__import__

        def no_scipy(name, *args, **kwargs):
            if name.startswith("scipy"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_scipy)
    model = tiny_model()
    monitor = TrainingMonitor(every=2, metadata={"lr": 0.1, "label": "tiny"})
    train(monitor, model, tiny_batches())
    out = monitor.save(tmp_path / "run")
    assert (out / "run.mat").exists() == with_scipy
    run, back = monitor.run(), load_run(out)
    for group in ("steps", "records", "epochs"):
        a, b = getattr(run, group), getattr(back, group)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(run.eigenvalues, back.eigenvalues)
    assert back.meta["label"] == "tiny" and back.label == "tiny"
    assert back.meta["every"] == 2 and back.meta["rtol"] == 1e-10
    assert load_run(out / "run.json").meta == back.meta
    if with_scipy:
        from scipy.io import loadmat

        mat = loadmat(out / "run.mat")
        np.testing.assert_array_equal(mat["eigenvalues"], run.eigenvalues)
    assert not list(out.glob("*.tmp"))


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"run.json is missing"):
        load_run(tmp_path / "nothing")
    monitor = TrainingMonitor()
    monitor.step(tiny_model(), tiny_batches()[0])
    out = monitor.save(tmp_path / "run")
    (out / "run.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable run arrays"):
        load_run(out)
    out = save_run(monitor.run(), tmp_path / "run2")
    (out / "run.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable run metadata"):
        load_run(out)
    (out / "run.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an nnfim run"):
        load_run(out)
    (out / "run.json").write_text(json.dumps({"format": "nnfim.run", "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_run(out)
    out = save_run(monitor.run(), tmp_path / "run3")
    np.savez(out / "run.npz", eigenvalues=np.zeros(2))
    with pytest.raises(ValueError, match="missing arrays"):
        load_run(out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"max_examples": 0}, "max_examples"),
        ({"avg": 1.0}, "avg"),
    ],
)
def test_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TrainingMonitor(**kwargs)


def test_bad_batch_records_nothing() -> None:
    monitor = TrainingMonitor()
    model = tiny_model()
    before = model_state(model)
    with pytest.raises(ValueError, match="inputs, labels"):
        monitor.step(model, torch.randn(4, 5))
    assert_same_state(before, model_state(model))
    assert monitor.iteration == 0 and not monitor.run().steps["iteration"].size


def test_max_examples_truncates_the_spectrum_batch() -> None:
    model = tiny_model()
    xb, yb = tiny_batches()[0]
    monitor = TrainingMonitor(max_examples=3)
    monitor.step(model, (xb, yb))
    ref = torch.linalg.eigvalsh(reference_fisher(model, [(xb[:3], yb[:3])])).flip(0)
    got = monitor.eigenvalues()[0]
    assert got.shape == (9,)
    np.testing.assert_allclose(got[:6], ref[:6].numpy(), rtol=1e-7)
    assert math.isnan(monitor.run().records["grad_norm"][0])  # no .grad yet
