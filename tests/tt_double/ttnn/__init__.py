"""Test double of the part of `ttnn` the TT Galaxy backend uses. It computes nothing; it records calls.

Signatures follow ttnn's Python API as tt-metal and the tt vLLM worker call it:
- open_mesh_device / close_mesh_device / MeshShape / DispatchCoreConfig(axis=) / DispatchCoreAxis:
  ttnn/ttnn/distributed/distributed.py, and vllm/v1/worker/tt_worker.py (open_mesh_device, close_mesh_device)
- set_fabric_config / FabricConfig: tt-metal conftest.py set_fabric, tt_worker.py get_fabric_config
- as_tensor / ReplicateTensorToMesh / TILE_LAYOUT / DRAM_MEMORY_CONFIG / bfloat8_b:
  ttnn/ttnn/operations/core.py, used as in llama3_70b_galaxy/tt/generator_vllm.py allocate_vllm_kv_cache
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

calls: list[tuple[str, dict]] = []  # (function name, its arguments), in call order


class FabricConfig(enum.Enum):
    DISABLED = 0
    FABRIC_1D = 1
    FABRIC_1D_RING = 2
    FABRIC_2D = 3
    CUSTOM = 4


class DispatchCoreAxis(enum.Enum):
    ROW = 0
    COL = 1


class DispatchCoreType(enum.Enum):
    WORKER = 0
    ETH = 1


@dataclass(frozen=True)
class DispatchCoreConfig:
    type: DispatchCoreType | None = None
    axis: DispatchCoreAxis | None = None


class DataType(enum.Enum):
    BFLOAT16 = 0
    FLOAT32 = 1
    UINT32 = 2
    BFLOAT8_B = 3
    INT32 = 7


bfloat16, float32, uint32, bfloat8_b, int32 = (DataType.BFLOAT16, DataType.FLOAT32, DataType.UINT32,
                                               DataType.BFLOAT8_B, DataType.INT32)


class Layout(enum.Enum):
    ROW_MAJOR = 0
    TILE = 1


ROW_MAJOR_LAYOUT, TILE_LAYOUT = Layout.ROW_MAJOR, Layout.TILE


@dataclass(frozen=True)
class MemoryConfig:
    buffer_type: str


DRAM_MEMORY_CONFIG, L1_MEMORY_CONFIG = MemoryConfig("DRAM"), MemoryConfig("L1")
DEFAULT_L1_SMALL_SIZE, DEFAULT_TRACE_REGION_SIZE, DEFAULT_WORKER_L1_SIZE = 0, 0, 0


class MeshShape(tuple):
    def __new__(cls, *dims: int):
        return super().__new__(cls, dims)


class MeshDevice:
    def __init__(self, shape: MeshShape):
        self.shape = shape
        self.is_open = True

    def get_num_devices(self) -> int:
        return self.shape[0] * self.shape[1]

    def get_submeshes(self) -> list[MeshDevice]:
        return []


class ReplicateTensorToMesh:
    def __init__(self, mesh_device: MeshDevice):
        self.mesh_device = mesh_device


@dataclass
class Tensor:
    shape: tuple[int, ...]
    dtype: DataType
    layout: Layout
    memory_config: MemoryConfig
    device: MeshDevice | None


def set_fabric_config(fabric_config: FabricConfig, reliability_mode=None) -> None:
    calls.append(("set_fabric_config", {"fabric_config": fabric_config, "reliability_mode": reliability_mode}))


def open_mesh_device(mesh_shape: MeshShape, l1_small_size: int = DEFAULT_L1_SMALL_SIZE,
                     trace_region_size: int = DEFAULT_TRACE_REGION_SIZE, num_command_queues: int = 1,
                     dispatch_core_config: DispatchCoreConfig = DispatchCoreConfig(), offset=None,
                     physical_device_ids=(), worker_l1_size: int = DEFAULT_WORKER_L1_SIZE) -> MeshDevice:
    assert isinstance(mesh_shape, MeshShape)
    calls.append(("open_mesh_device", {"mesh_shape": mesh_shape, "l1_small_size": l1_small_size,
                                       "trace_region_size": trace_region_size,
                                       "num_command_queues": num_command_queues,
                                       "dispatch_core_config": dispatch_core_config,
                                       "worker_l1_size": worker_l1_size}))
    return MeshDevice(mesh_shape)


def close_mesh_device(mesh_device: MeshDevice) -> None:
    assert mesh_device.is_open, "mesh closed twice"
    mesh_device.is_open = False
    calls.append(("close_mesh_device", {"mesh_device": mesh_device}))


def as_tensor(tensor, dtype: DataType | None = None, *, layout: Layout = ROW_MAJOR_LAYOUT, device=None,
              memory_config: MemoryConfig | None = None, cache_file_name=None, preprocess=None, mesh_mapper=None,
              use_device_tilizer: bool = False) -> Tensor:
    calls.append(("as_tensor", {"shape": tuple(tensor.shape), "dtype": dtype, "layout": layout,
                                "memory_config": memory_config, "mesh_mapper": mesh_mapper,
                                "cache_file_name": cache_file_name}))
    return Tensor(tuple(tensor.shape), dtype, layout, memory_config, device)
