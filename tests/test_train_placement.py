"""The train stage's placement as Ray Train's ``ScalingConfig``, checked without accelerators:
TPU slices against what Ray's own TPU tables (``ray.util.tpu``) compute for them, GPU and CPU
worker groups, and the CPU workers' environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.util import tpu

from stages.train.config import PlacementConfig
from stages.train.hosts import scaling_config, worker_env
from stages.train.malloc import ENV as MALLOC_ENV

# (name, topology, accelerator_type, slices): hosts per slice and chips per host as Cloud TPU
# documents them (v4-32: 16 chips on 4 hosts; v5p-128: 64 chips on 16; v5litepod-16: 16 on 4).
SLICES = [
    ("v4-32", "2x2x4", "TPU-V4", 1, 4, 4),
    ("v5p-128", "4x4x4", "TPU-V5P", 1, 16, 4),
    ("2 x v5litepod-16", "4x4", "TPU-V5LITEPOD", 2, 4, 4),
]


@pytest.mark.parametrize(("name", "topology", "accelerator", "slices", "hosts", "chips"), SLICES)
def test_tpu_slices_are_placed_as_rays_tables_lay_them_out(
    name: str, topology: str, accelerator: str, slices: int, hosts: int, chips: int
) -> None:
    placement = PlacementConfig(
        platform="tpu", topology=topology, accelerator_type=accelerator, slices=slices
    )
    scaling = scaling_config(placement)
    workers, resources = tpu.get_tpu_worker_resources(topology, accelerator, num_slices=slices)
    assert scaling.use_tpu and not scaling.use_gpu
    assert (scaling.topology, scaling.accelerator_type) == (topology, accelerator)
    assert scaling.num_workers == workers == slices * hosts, name
    assert scaling.resources_per_worker == resources and resources["TPU"] == chips, name
    assert tpu.get_tpu_num_slices_for_workers(topology, accelerator, workers) == slices
    assert placement.workers() * placement.chips_per_worker() == slices * hosts * chips
    assert worker_env(placement) == {}


def test_gpu_and_cpu_worker_groups() -> None:
    gpu = scaling_config(PlacementConfig(platform="gpu", hosts=2, devices_per_host=8))
    assert (gpu.num_workers, gpu.use_gpu, gpu.use_tpu) == (2, True, False)
    assert gpu.resources_per_worker == {"CPU": 1, "GPU": 8}
    cpu_placement = PlacementConfig(hosts=2, devices_per_host=2, cpus_per_host=0.5)
    cpu = scaling_config(cpu_placement)
    assert (cpu.num_workers, cpu.use_gpu, cpu.use_tpu) == (2, False, False)
    assert cpu.resources_per_worker == {"CPU": 0.5}
    env = worker_env(cpu_placement)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu" and MALLOC_ENV.items() <= env.items()


def test_tpu_fields_are_checked() -> None:
    with pytest.raises(ValidationError, match="topology and accelerator_type"):
        PlacementConfig(platform="tpu", topology="2x2x4")
    with pytest.raises(ValidationError, match="are for platform tpu"):
        PlacementConfig(platform="gpu", slices=2)
