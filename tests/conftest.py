import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The exactness and precision tests run on this device (CI: the CPU; on a GPU machine:
# DPSPEED_TEST_DEVICE=cuda python -m pytest tests/test_exactness.py tests/test_precision.py).
DEVICE = torch.device(os.environ.get("DPSPEED_TEST_DEVICE", "cpu"))
