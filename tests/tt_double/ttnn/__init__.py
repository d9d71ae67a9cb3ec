"""Test double of the part of `ttnn` the TT Galaxy backend (and the generator double) uses. It computes
nothing; it records calls, and records as `errors` what real ttnn would fail on in a finaliser or at close
(so a wrong close order shows even where the real error would be swallowed by `__del__`).

Signatures follow ttnn's Python API as tt-metal and the tt vLLM worker call it:
- open_mesh_device / close_mesh_device / MeshShape / DispatchCoreConfig(axis=) / DispatchCoreAxis, and the
  close order submeshes -> mesh -> fabric: tenstorrent/vllm vllm/worker/tt_worker.py @987d7bd2
  (open_mesh_device, close_mesh_device, set_fabric, reset_fabric)
- set_fabric_config / FabricConfig: same file, get_fabric_config / set_fabric; get_device_ids: its get_mesh_grid
- MeshDevice.create_submeshes: models/tt_transformers/tt/generator.py create_submeshes (tt-metal)
- as_tensor / ReplicateTensorToMesh / TILE_LAYOUT / DRAM_MEMORY_CONFIG / bfloat8_b: ttnn/ttnn/operations/core.py,
  as used by tt-metal models/demos/llama3_70b_galaxy/tt/generator_vllm.py @0be6ffc8 allocate_vllm_kv_cache
- begin/end_trace_capture, release_trace, deallocate: as called by the Galaxy generator.py @00b0fa3f
- record_event / event_synchronize / to_torch, and a tensor's cpu(blocking=False): its read_decode_output(async_read)
  and process_decode_output_host, and tenstorrent/vllm vllm/worker/tt_model_runner.py @00d852e2's read of them
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

calls: list[tuple[str, dict]] = []  # (function name, its arguments), in call order
errors: list[str] = []  # misuse real ttnn would fail on (tests assert it stays empty)
_open_meshes: list[MeshDevice] = []
_trace_ids = itertools.count(1)
num_devices = 32  # the chips this host has (a Galaxy's); tests set fewer


def reset() -> None:
    calls.clear()
    errors.clear()
    _open_meshes.clear()


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
        self._submeshes: list[MeshDevice] = []

    def get_num_devices(self) -> int:
        return self.shape[0] * self.shape[1]

    def create_submeshes(self, submesh_shape: MeshShape) -> list[MeshDevice]:
        count = self.get_num_devices() // (submesh_shape[0] * submesh_shape[1])
        subs = [MeshDevice(submesh_shape) for _ in range(count)]
        self._submeshes += subs
        _open_meshes.extend(subs)
        return subs

    def get_submeshes(self) -> list[MeshDevice]:
        return list(self._submeshes)


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
    is_allocated: bool = True
    # Double-only: a replicated KV tensor has its own memory on every chip, and only a mesh column's users
    # touch that column's copy; the generator double keeps the token id each column's copy holds here.
    columns: torch.Tensor | None = field(default=None, repr=False)


class Event:
    """A recorded point in a command queue (ttnn.record_event); event_synchronize waits for it."""

    def __init__(self):
        self.synchronized = False


def record_event(mesh_device: MeshDevice, cq_id: int = 0) -> Event:
    calls.append(("record_event", {"cq_id": cq_id}))
    return Event()


def event_synchronize(event: Event) -> None:
    event.synchronized = True
    calls.append(("event_synchronize", {}))


class DeviceBuffer:
    """Double-only: a device tensor the generator double writes in place (a trace's persistent input or output).
    cpu(blocking=False) is the copy a command queue makes when it reaches it: the values as they are then, which
    the host may read once the event recorded after it is synchronised."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def cpu(self, blocking: bool = True, cq_id: int = 0, event: Event | None = None) -> HostTensor:
        return HostTensor(self.value.clone(), None if blocking else event)


@dataclass
class HostTensor:
    value: torch.Tensor
    event: Event | None = None  # the read's event, when it was enqueued without blocking


def to_torch(tensor: HostTensor) -> torch.Tensor:
    if tensor.event is not None and not tensor.event.synchronized:
        errors.append("a non-blocking read used before its event was synchronised")
    return tensor.value.clone()


def set_fabric_config(fabric_config: FabricConfig, reliability_mode=None) -> None:
    if fabric_config == FabricConfig.DISABLED and _open_meshes:
        errors.append("fabric disabled while a mesh is open")
    calls.append(("set_fabric_config", {"fabric_config": fabric_config, "reliability_mode": reliability_mode}))


def get_device_ids() -> list[int]:
    """ttnn.distributed's: one id per chip the host has (as tenstorrent/vllm's tt_worker.py get_mesh_grid counts
    them before it opens a mesh)."""
    return list(range(num_devices))


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
    mesh = MeshDevice(mesh_shape)
    _open_meshes.append(mesh)
    return mesh


def close_mesh_device(mesh_device: MeshDevice) -> None:
    assert mesh_device.is_open, "mesh closed twice"
    if any(sub.is_open for sub in mesh_device._submeshes):
        errors.append("mesh closed before its submeshes")
    mesh_device.is_open = False
    _open_meshes.remove(mesh_device)
    calls.append(("close_mesh_device", {"mesh_device": mesh_device}))


def as_tensor(tensor, dtype: DataType | None = None, *, layout: Layout = ROW_MAJOR_LAYOUT, device=None,
              memory_config: MemoryConfig | None = None, cache_file_name=None, preprocess=None, mesh_mapper=None,
              use_device_tilizer: bool = False) -> Tensor:
    calls.append(("as_tensor", {"shape": tuple(tensor.shape), "dtype": dtype, "layout": layout,
                                "memory_config": memory_config, "mesh_mapper": mesh_mapper,
                                "cache_file_name": cache_file_name}))
    return Tensor(tuple(tensor.shape), dtype, layout, memory_config, device)


def deallocate(tensor: Tensor, force: bool = True) -> None:
    if tensor.device is not None and not tensor.device.is_open:
        errors.append("tensor deallocated after its mesh closed")
    tensor.is_allocated = False
    calls.append(("deallocate", {"tensor": tensor}))


def begin_trace_capture(mesh_device: MeshDevice, cq_id: int = 0) -> int:
    trace_id = next(_trace_ids)
    calls.append(("begin_trace_capture", {"trace_id": trace_id}))
    return trace_id


def end_trace_capture(mesh_device: MeshDevice, trace_id: int, cq_id: int = 0) -> None:
    calls.append(("end_trace_capture", {"trace_id": trace_id}))


def release_trace(mesh_device: MeshDevice, trace_id: int) -> None:
    if not mesh_device.is_open:
        errors.append("trace released after its mesh closed")
    calls.append(("release_trace", {"trace_id": trace_id}))
