import shutil
import tempfile

import pytest
import torch

from model.config import UNetConfig
from pipelines.core.local_ray import FOREIGN_RAY_VARS, private_ray_env, write_token

_RAY_ENV = pytest.StashKey[tuple[pytest.MonkeyPatch, str, str]]()  # what pytest_unconfigure undoes and removes


def pytest_configure(config: pytest.Config) -> None:
    """Every Ray this test session starts or joins is private: token auth with a token made for this session
    (in a 0700 temp dir, removed at the end; never ~/.ray), and 127.0.0.1 only. Set here, before any test
    module imports Ray (a process reads these once), and inherited by the jobs tests run as subprocesses."""
    token_dir = tempfile.mkdtemp(prefix="latentforge-tests-ray-")
    patch = pytest.MonkeyPatch()
    for name in FOREIGN_RAY_VARS:
        patch.delenv(name, raising=False)
    for name, value in private_ray_env({}, write_token(token_dir)).items():
        patch.setenv(name, value)
    # Stages run without mlflow.tracking_uri (the data stages log their reports as runs) log into this session's
    # own store, never into ./mlflow.db of the checkout.
    store_dir = tempfile.mkdtemp(prefix="latentforge-tests-mlflow-")
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir}/mlflow.db")
    config.stash[_RAY_ENV] = (patch, token_dir, store_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    patch, token_dir, store_dir = config.stash[_RAY_ENV]
    patch.undo()
    shutil.rmtree(token_dir, ignore_errors=True)
    shutil.rmtree(store_dir, ignore_errors=True)


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
def _gloo_group():
    """One one-rank gloo process group for the whole session. DeepSpeed keeps the group it first sees
    (deepspeed.comm, deepspeed.utils.groups), so a group destroyed and made again would leave it stale."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield port
    dist.destroy_process_group()


@pytest.fixture
def gloo_world_of_one(_gloo_group, monkeypatch):
    """The session's one-rank gloo group, with the launcher variables DeepSpeed reads set for this test only
    (outside a launcher DeepSpeed reads them, or falls back to mpi4py and fails)."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_gloo_group), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (started on first use, 2 CPUs, no dashboard), private
    through pytest_configure's environment."""
    import ray

    from pipelines.core.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_download(ray_local, tmp_path_factory):
    """The synthetic web downloaded once for the session (tests/synthetic_download.py): test_download.py and
    test_data_chain.py both read it; a test that changes a download works on a copy."""
    from tests.synthetic_download import download_once

    return download_once(tmp_path_factory.mktemp("synthetic-download"))
