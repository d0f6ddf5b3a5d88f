"""Ready callbacks for `PrivacyEngine.on_step`: a CSV file, or TensorBoard."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

from .metrics import StepMetrics


class CSVWriter:
    """Appends one row per logical step to `path` (a header first, when the file is new)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns = [f.name for f in fields(StepMetrics)]
        if not self.path.exists() or self.path.stat().st_size == 0:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)

    def __call__(self, metrics: StepMetrics) -> None:
        row = metrics.as_dict()
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if row[c] is None else row[c] for c in self._columns])


class TensorBoardWriter:
    """Writes each step's numbers as scalars under `dp/` in `log_dir` (needs the tensorboard package)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"TensorBoardWriter needs tensorboard: pip install tensorboard ({err})") from err
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, metrics: StepMetrics) -> None:
        for name, value in metrics.as_dict().items():
            if name != "step" and value is not None:
                self.writer.add_scalar(f"dp/{name}", value, metrics.step)
        self.writer.flush()
