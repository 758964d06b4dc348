import os

import pytest
import torch

# DeepSpeed must pick its CPU accelerator before it is first imported (lightning_ulysses sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
