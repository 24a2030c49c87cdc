"""Applications built on the Fisher: training monitor and plots."""

from nnfim.apps.monitor import Run, TrainingMonitor, load_run, save_run

__all__ = ["Run", "TrainingMonitor", "load_run", "save_run"]
