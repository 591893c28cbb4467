import os

import pytest
import torch

# Never reach for a model hub from the test suite.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
