"""What a DP run does at each logical step (`engine.on_step`), and writers for it."""

from .metrics import StepMetrics
from .writers import CSVWriter, TensorBoardWriter

__all__ = ["StepMetrics", "CSVWriter", "TensorBoardWriter"]
