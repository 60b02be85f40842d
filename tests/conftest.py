import os

import pytest
import torch

# Two cores are shared with other work: oversubscribed intra-op threads are many times slower.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


REDIS_TEST_URL = os.environ.get("SPECDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session", autouse=True)
def output_root(tmp_path_factory):
    """Job outputs are confined to SPECDIT_OUTPUT_ROOT: make it pytest's base temporary folder, so a job spec
    may name any ``tmp_path`` (it is stored relative to the root). Subprocesses inherit it."""
    root = tmp_path_factory.getbasetemp()
    old = os.environ.get("SPECDIT_OUTPUT_ROOT")
    os.environ["SPECDIT_OUTPUT_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SPECDIT_OUTPUT_ROOT", None)
    else:
        os.environ["SPECDIT_OUTPUT_ROOT"] = old


@pytest.fixture
def redis_env():
    """(client, key prefix) on the test Redis under a fresh random prefix, removed afterwards."""
    from cluster.connection import connect
    from cluster.errors import RedisUnavailable
    from cluster.testing import cleanup_prefix, make_prefix

    try:
        client = connect(REDIS_TEST_URL)
    except RedisUnavailable as e:
        pytest.skip(str(e))
    prefix = make_prefix()
    yield client, prefix
    cleanup_prefix(client, prefix)


@pytest.fixture(scope="session")
def gmm2d():
    from specdit.models.gmm import GMM_PRESETS

    return GMM_PRESETS["gmm-2d"]()


def tiny_dit_transformer(seed: int = 0):
    """A tiny random class-conditional DiT (8x8x1 pixels, patch 2 -> 16 tokens, hidden 32, 3 classes)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    with torch.no_grad():  # make every layer clearly non-trivial (adaLN-Zero starts at zero)
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tr.eval()


def tiny_training_data():
    """64 random 8x8 'images' in [-1, 1] with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (64,), generator=g)
