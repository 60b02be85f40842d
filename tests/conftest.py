import os

import pytest
import torch

# Two cores are shared with other work: oversubscribed intra-op threads are many times slower.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def gmm2d():
    from specdit.models.gmm import GMM_PRESETS

    return GMM_PRESETS["gmm-2d"]()
