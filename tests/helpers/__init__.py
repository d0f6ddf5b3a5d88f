"""What several test files share: the small models, process groups, a memory meter, the device."""

import os

import torch

# The exactness and precision tests run on this device (CI: the CPU; on a GPU machine:
# DPSPEED_TEST_DEVICE=cuda python -m pytest tests/test_exactness.py tests/layers/test_precision.py).
DEVICE = torch.device(os.environ.get("DPSPEED_TEST_DEVICE", "cpu"))
