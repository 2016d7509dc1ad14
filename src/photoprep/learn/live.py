"""Per-epoch training metrics to dvclive, for the train stage (the library runs without dvclive)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from photoprep.core.layout import PATHS

if TYPE_CHECKING:
    from photoprep.learn.train import TrainResult

__all__ = ["LiveLog"]


class LiveLog:
    """Per-epoch metrics to dvclive (``train/loss``, ``train/accuracy``, ``val/loss``,
    ``val/accuracy``, ``lr``; step = epoch). dvclive writes no dvc.yaml and saves no
    experiment: the pipeline's dvc.yaml declares the plots."""

    def __init__(self, directory: str | Path = PATHS.live_dir) -> None:
        from dvclive import Live  # only the stage logs; the library runs without dvclive

        self.live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)

    def __call__(self, record: dict[str, float]) -> None:
        self.live.step = int(record["epoch"])
        for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            split, metric = name.split("_", 1)
            value = record[name]
            if not (isinstance(value, float) and math.isnan(value)):
                self.live.log_metric(f"{split}/{metric}", value)
        self.live.log_metric("lr", record["lr"])
        self.live.next_step()

    def close(self, result: TrainResult | None = None) -> None:
        if result is not None and result.meta.get("best_val"):
            self.live.summary["best"] = {
                "epoch": result.meta["best_epoch"],
                "val_loss": result.meta["best_val"]["loss"],
                "val_accuracy": result.meta["best_val"]["accuracy"],
            }
        self.live.end()
