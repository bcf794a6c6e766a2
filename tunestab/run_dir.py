"""A search's run folder, `<storage>/<space name>-<YYYYmmdd-HHMMSS>/`: every file name in it, in
one place. The search writes it, `--resume` and `python -m tunestab.replay` read it back.

    tunestab_search.json   the parent MLflow run, the tracking URI, and whether the search finished
    space.yaml             the space file as it ran (replay rebuilds the report from it)
    tune/<name>/           Tune's experiment: every trial's reports (result.json) and state
    train/<trial id>/      each trial's Ray Train run and checkpoints (unless train_storage is set)
    optuna.db              the Optuna study (SQLite)
    tev_scheduler.json     the TEV scheduler's state, which survives Tuner.restore
    mlflow_incomplete      present when something did not reach MLflow: replay logs it
    trials.csv, summary.*, *.png, ...   the report (tunestab/report.py names them below)
"""

from __future__ import annotations

import time
from pathlib import Path

STATE_FILE = "tunestab_search.json"
SPACE_COPY = "space.yaml"
TUNE_DIR = "tune"
TRAIN_DIR = "train"
OPTUNA_DB = "optuna.db"
SCHEDULER_STATE = "tev_scheduler.json"
INCOMPLETE_FILE = "mlflow_incomplete"

# The report's files.
TRIALS_CSV = "trials.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
RATIOS_CSV = "ratios.csv"
P_DIVERGE_PNG = "p_diverge.png"
LOSS_VS_LR_PNG = "loss_vs_lr.png"
TEV_CURVES_PNG = "tev_curves.png"
PARAMS_VS_LOSS_PNG = "params_vs_loss.png"
LR_SENSITIVITY_CSV = "lr_sensitivity.csv"
CELLS_CSV = "cells.csv"
SCALE_CSV = "scale.csv"
SCALE_MD = "scale.md"
FRONTIER_PNG = "frontier.png"
PER_CONFIG_CSV = "max_stable_lr_per_config.csv"
CONFIGS_CSV = "configs.csv"


def new(storage: Path, name: str) -> Path:
    """A fresh run folder for a search of space `name`."""
    path = storage / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True)
    return path


def newest(storage: Path, name: str) -> Path | None:
    """The newest run folder of space `name` that a search started (it has a state file)."""
    dirs = sorted(p for p in storage.glob(f"{name}-*") if (p / STATE_FILE).exists())
    return dirs[-1] if dirs else None
