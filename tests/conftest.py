import pytest
import torch

from model.config import UNetConfig


@pytest.fixture
def micro_cfg() -> UNetConfig:
    """The smallest config that still exercises every block type (both attention kinds, skips
    across levels, channel changes): keeps unit tests in the sub-second range."""
    return UNetConfig(
        block_channels=(16, 32, 32),
        attention_levels=(True, True, False),
        num_heads=(2, 2, 2),
        layers_per_block=1,
        context_dim=24,
        norm_groups=8,
        sample_size=8,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
