"""Learner → rollout weight sync: packing parameters into buckets, and the two transports.

After an update, learner rank 0 ships the full (un-partitioned) parameters to
every rollout engine under their Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, …). Shipping them one by one costs
one round trip per parameter, so they travel in *buckets*: a `WeightBucket`
holds the names, shapes and dtypes of a run of parameters and ONE flat
contiguous byte tensor with their data back to back.

Bucket boundaries follow one rule, `plan_buckets` (and its streaming twin
`pack_buckets`): parameters join the open bucket in order, and the bucket is
closed as soon as its size *exceeds* `bucket_bytes`. So every bucket but the
last holds more than `bucket_bytes` and at most `bucket_bytes` plus one
parameter. This is exactly the rule vLLM 0.32's packed NCCL receiver uses to
cut its receive buffers from the metadata
(`vllm/distributed/weight_transfer/packed_tensor.py`,
`packed_nccl_broadcast_consumer` / `pack_tensors`), so a stock
`NCCLWeightTransferEngine` with `packed=True, packed_buffer_size_bytes =
bucket_bytes` receives our buckets one broadcast each.

Transports (`WeightTransport`): `ObjectStoreTransport` puts each bucket in the
Ray object store (CPU path, the default); `NcclTransport` broadcasts each
bucket's bytes from rank 0 over a NCCL group shared with the engines (GPU
only). The learner drives either through the same loop
(`capo_dist.learner.Learner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import ray
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class ParamSpec:
    """Name, full shape and dtype of one parameter, known without gathering it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class WeightBucket:
    """A run of full parameters packed back to back into one flat byte tensor.

    `flat` is 1-D, contiguous, `torch.uint8`; parameter i occupies
    `nbytes[i]` bytes after the previous ones. Raw bytes (rather than one
    dtype) let a bucket mix dtypes and match vLLM's packed wire format.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    flat: torch.Tensor
    nbytes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = [
                math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True)
            ]
        if not (len(self.names) == len(self.shapes) == len(self.dtypes) == len(self.nbytes)):
            raise ValueError("WeightBucket: names, shapes, dtypes and nbytes differ in length")
        if self.flat.dtype != torch.uint8 or self.flat.dim() != 1:
            raise ValueError(
                f"WeightBucket.flat must be 1-D uint8, got {self.flat.dtype} {tuple(self.flat.shape)}"
            )
        if self.flat.numel() != sum(self.nbytes):
            raise ValueError(
                f"WeightBucket.flat has {self.flat.numel()} bytes, metadata says {sum(self.nbytes)}"
            )

    @property
    def specs(self) -> list[ParamSpec]:
        return [
            ParamSpec(n, tuple(s), d)
            for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)
        ]

    def __reduce__(self):
        """Pickle `flat` as a numpy array: Ray then moves it out-of-band, zero-copy on read.

        (A torch tensor would go through torch's own serialiser: the profiled
        cost was ~0.15 s per 64 MiB bucket to put and ~0.1 s to get, vs
        ~0.01-0.08 s and ~0.0004 s as numpy.)
        """
        flat = self.flat.detach().cpu().numpy()
        return (_bucket_from_numpy, (self.names, self.shapes, self.dtypes, flat, self.nbytes))

    def to(self, device: torch.device | str) -> WeightBucket:
        """The same bucket with its bytes on `device` (no copy if already there)."""
        return WeightBucket(self.names, self.shapes, self.dtypes, self.flat.to(device), self.nbytes)

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        """`(name, tensor)` pairs with the original shapes and dtypes, in packing order.

        The tensors are views of `flat` (no copy) unless a parameter starts at
        a byte offset its dtype cannot be viewed at, which is then copied.
        """
        out: list[tuple[str, torch.Tensor]] = []
        offset = 0
        for name, shape, dtype, n in zip(
            self.names, self.shapes, self.dtypes, self.nbytes, strict=True
        ):
            chunk = self.flat[offset : offset + n]
            if offset % dtype.itemsize:
                chunk = chunk.clone()
            out.append((name, chunk.view(dtype).view(shape)))
            offset += n
        return out


def _bucket_from_numpy(names, shapes, dtypes, flat, nbytes) -> WeightBucket:
    """Rebuild a pickled bucket around the received bytes (read-only in Ray's object store:
    the tensors are only ever copied into a model, never written)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return WeightBucket(names, shapes, dtypes, torch.from_numpy(flat), nbytes)


def _cut(items: Iterable[T], size_of: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """Group `items` in order; a group closes once its size exceeds `bucket_bytes` (vLLM's rule)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    group: list[T] = []
    total = 0
    for item in items:
        group.append(item)
        total += size_of(item)
        if total > bucket_bytes:
            yield group
            group, total = [], 0
    if group:
        yield group


def plan_buckets(specs: Sequence[ParamSpec], bucket_bytes: int) -> list[list[ParamSpec]]:
    """The bucket boundaries for `specs` (in order), computed from metadata alone.

    The learner uses it to gather one bucket's parameters at a time; the
    boundaries equal what `pack_buckets` and vLLM's packed receiver produce.
    """
    return list(_cut(specs, lambda s: s.nbytes, bucket_bytes))


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[WeightBucket]:
    """Pack `(name, tensor)` pairs into `WeightBucket`s, lazily, one bucket at a time.

    Tensors are consumed from the iterable only as far as the bucket being
    built needs, so a caller that materialises them on the fly holds at most
    one bucket's worth of them. Each bucket's bytes are a fresh copy, on the
    tensors' device.
    """
    for group in _cut(named_tensors, lambda nt: nt[1].numel() * nt[1].element_size(), bucket_bytes):
        flats = [t.detach().contiguous().view(-1).view(torch.uint8) for _, t in group]
        yield WeightBucket(
            names=[name for name, _ in group],
            shapes=[tuple(t.shape) for _, t in group],
            dtypes=[t.dtype for _, t in group],
            flat=torch.cat(flats) if len(flats) > 1 else flats[0].clone(),
        )


class WeightTransport(Protocol):
    """How learner rank 0 hands buckets to the rollout engines.

    `send` is called once per bucket, in plan order; `finish` once after the
    last bucket, and returns whatever the driver needs to complete the sync.
    """

    def send(self, bucket: WeightBucket) -> None: ...

    def finish(self) -> list[ray.ObjectRef] | None: ...


class ObjectStoreTransport:
    """Buckets go into the Ray object store; the driver passes the refs to each engine.

    The CPU path. Each bucket is copied to CPU and `ray.put`; the learner
    process keeps no copy. The object store holds the whole model (in the
    training dtype) until every engine has loaded it and the refs are
    dropped; Ray spills to disk past its memory limit.
    """

    def __init__(self) -> None:
        self._refs: list[ray.ObjectRef] = []

    def send(self, bucket: WeightBucket) -> None:
        self._refs.append(ray.put(bucket.to("cpu")))

    def finish(self) -> list[ray.ObjectRef]:
        refs, self._refs = self._refs, []
        return refs


@dataclass(frozen=True)
class NcclSyncPlan:
    """What the rollout engines need to receive one NCCL sync, as vLLM 0.32 payloads.

    `init_info` is the keyword dict of
    `vllm.distributed.weight_transfer.nccl_common.NCCLWeightTransferInitInfo`
    (for `init_weight_transfer_engine`, once); `update_info` that of
    `vllm.distributed.weight_transfer.nccl_engine.NCCLWeightTransferUpdateInfo`
    (for `update_weights`, every sync). Both are plain dicts so they travel
    through Ray or HTTP unchanged.
    """

    init_info: dict[str, Any]
    update_info: dict[str, Any]


class NcclTransport:
    """Rank 0 broadcasts each bucket's bytes over a NCCL group shared with the engines.

    GPU ONLY: it needs CUDA and vLLM's `PyNcclCommunicator`; it cannot run on
    the CPU machines and is not exercised by the test suite beyond its
    metadata (`plan`).

    Wire protocol = vLLM 0.32's packed NCCL weight transfer
    (`vllm/distributed/weight_transfer/{nccl_common,nccl_engine,packed_tensor}.py`):

    * rendezvous: a `StatelessProcessGroup` on `master_address:master_port`
      of `world_size` = 1 + number of engine workers; the learner is NCCL
      rank 0 and the workers sit at `rank_offset=1`
      (`nccl_common.trainer_init` on our side, `worker_init_process_group`
      on theirs);
    * per sync, metadata (names, dtype names, shapes, in plan order) goes to
      the engines via Ray as `NCCLWeightTransferUpdateInfo`; the engines
      cut their receive buffers from it with the same rule as
      `plan_buckets` (`packed=True`, `packed_buffer_size_bytes=bucket_bytes`),
      and rank 0 broadcasts each `WeightBucket.flat` (uint8) with `src=0`.

    vLLM's receiver views every tensor in place in its receive buffer, so
    each parameter's byte offset must be a multiple of its dtype size: true
    when all parameters share one dtype (our bf16/fp32 training), not for
    arbitrary mixes (`WeightBucket.unpack` copies those; vLLM would refuse).

    The engines must be inside `update_weights` while rank 0 broadcasts
    (both sides meet inside the same NCCL calls), so the driver starts the
    engines' `update_weights` and the learners' `broadcast_weights`
    concurrently.
    """

    def __init__(self, communicator: Any) -> None:
        self._comm = communicator

    @classmethod
    def connect(cls, master_address: str, master_port: int, world_size: int) -> NcclTransport:
        """Join the learner↔engines NCCL group as rank 0 (blocks until every worker joins)."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        comm = trainer_init(
            {
                "master_address": master_address,
                "master_port": master_port,
                "world_size": world_size,
            },
            rank=0,
        )
        return cls(comm)

    @staticmethod
    def plan(
        specs: Sequence[ParamSpec],
        bucket_bytes: int,
        master_address: str,
        master_port: int,
        world_size: int,
        num_buffers: int = 2,
    ) -> NcclSyncPlan:
        """The engines' init and update payloads for syncing `specs` in `bucket_bytes` buckets."""
        init_info = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": 1,
            "world_size": world_size,
            "packed": True,
            "packed_buffer_size_bytes": bucket_bytes,
            "packed_num_buffers": num_buffers,
        }
        update_info = {
            "names": [s.name for s in specs],
            "dtype_names": [str(s.dtype).removeprefix("torch.") for s in specs],
            "shapes": [list(s.shape) for s in specs],
        }
        return NcclSyncPlan(init_info=init_info, update_info=update_info)

    def send(self, bucket: WeightBucket) -> None:
        flat = bucket.flat if bucket.flat.is_cuda else bucket.flat.cuda()
        self._comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())

    def finish(self) -> None:
        torch.cuda.current_stream().synchronize()
        return None
