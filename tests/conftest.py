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


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (started on first use, 2 CPUs, no dashboard)."""
    import os

    import ray
    from pipelines.runtime import init_ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.fail("RAY_ADDRESS is set: tests start their own local Ray; unset it")
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
