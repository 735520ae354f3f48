"""Bucketing of weights for sync: exact round trips, the boundary rule, vLLM wire compatibility."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.weight_sync import (
    CollectiveTransport,
    ParamSpec,
    WeightBucket,
    engine_rank_offsets,
    engines_to_reload,
    pack_buckets,
    plan_buckets,
)


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and odd sizes, so some tensors start at offsets their dtype cannot view."""
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(7, 5, generator=g)),
        ("model.norm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes
        ("lm_head.weight", torch.randn(4, 3, generator=g)),  # starts at an odd multiple of 2
        ("a.half", torch.randn(5, generator=g).half()),
        ("a.count", torch.arange(6, dtype=torch.int64).view(2, 3)),
        ("a.scalar", torch.tensor(3.5)),
    ]


def specs_of(named: list[tuple[str, torch.Tensor]]) -> list[ParamSpec]:
    return [ParamSpec(n, tuple(t.shape), t.dtype) for n, t in named]


@pytest.mark.parametrize("bucket_bytes", [1, 40, 100, 10_000])
def test_pack_unpack_round_trip_is_exact(bucket_bytes: int) -> None:
    named = mixed_tensors()
    buckets = list(pack_buckets(iter(named), bucket_bytes))
    out = [pair for b in buckets for pair in b.unpack()]
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, got), (_, want) in zip(out, named, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    for b in buckets:
        assert b.flat.dtype == torch.uint8 and b.flat.dim() == 1 and b.flat.is_contiguous()
        assert b.flat.numel() == sum(s.nbytes for s in b.specs)
    # The bucket count and contents are what the metadata-only plan says.
    plan = plan_buckets(specs_of(named), bucket_bytes)
    assert [b.specs for b in buckets] == plan


def test_plan_closes_a_bucket_once_it_exceeds_the_size() -> None:
    sizes = [100, 100, 100, 300, 50]  # float32 vectors of size/4 elements
    specs = [ParamSpec(f"p{i}", (s // 4,), torch.float32) for i, s in enumerate(sizes)]
    plan = plan_buckets(specs, 150)
    assert [[s.name for s in b] for b in plan] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert len(plan_buckets(specs, 10**9)) == 1
    assert len(plan_buckets(specs, 1)) == len(specs)
    with pytest.raises(ValueError):
        plan_buckets(specs, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=400),
)
def test_plan_is_an_ordered_partition_with_bounded_buckets(
    numels: list[int], bucket_bytes: int
) -> None:
    specs = [ParamSpec(f"p{i}", (n,), torch.float32) for i, n in enumerate(numels)]
    plan = plan_buckets(specs, bucket_bytes)
    assert [s for b in plan for s in b] == specs
    for i, bucket in enumerate(plan):
        total = sum(s.nbytes for s in bucket)
        assert total - bucket[-1].nbytes <= bucket_bytes  # at most one parameter past the size
        if i < len(plan) - 1:
            assert total > bucket_bytes  # only the last bucket may be short


def test_pack_buckets_consumes_lazily() -> None:
    named = [(f"p{i}", torch.full((10,), float(i))) for i in range(6)]  # 40 bytes each
    taken: list[str] = []

    def source():
        for name, t in named:
            taken.append(name)
            yield name, t

    it = pack_buckets(source(), 70)
    first = next(it)
    assert first.names == ["p0", "p1"] and taken == ["p0", "p1"]
    assert [b.names for b in it] == [["p2", "p3"], ["p4", "p5"]]


def test_bucket_rejects_inconsistent_metadata() -> None:
    with pytest.raises(ValueError):
        WeightBucket(["a"], [(2,)], [torch.float32], torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(ValueError):
        WeightBucket(["a"], [(2,)], [torch.float32], torch.zeros(2))


def llama_like_tensors() -> list[tuple[str, torch.Tensor]]:
    """One dtype, as in a real model (vLLM's receiver views each tensor in place)."""
    g = torch.Generator().manual_seed(1)
    named = [("model.embed_tokens.weight", torch.randn(50, 16, generator=g))]
    for i in range(3):
        p = f"model.layers.{i}."
        named += [
            (p + "self_attn.q_proj.weight", torch.randn(16, 16, generator=g)),
            (p + "mlp.down_proj.weight", torch.randn(16, 40, generator=g)),
            (p + "input_layernorm.weight", torch.randn(16, generator=g)),
        ]
    return named + [("lm_head.weight", torch.randn(50, 16, generator=g))]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_collective_plan_matches_vllm_packed_receiver(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """vLLM 0.32's own packed NCCL consumer, fed our buckets, loads exactly our tensors.

    The consumer cuts its receive buffers from the update info alone; a fake
    NCCL group hands it our buckets' bytes in order and checks every receive
    buffer has exactly the size of the bucket we would broadcast. CUDA
    streams are stubbed so the real vLLM code runs on CPU.
    """
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import packed_tensor
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )

    named = [(n, t.to(dtype)) for n, t in llama_like_tensors()]
    specs = specs_of(named)
    bucket_bytes = 4000
    buckets = list(pack_buckets(iter(named), bucket_bytes))
    plan = CollectiveTransport.plan(specs, bucket_bytes, "127.0.0.1", 29600, [1, 1])
    init = NCCLWeightTransferInitInfo(**plan.init_infos[0])
    update = NCCLWeightTransferUpdateInfo(**plan.update_info)
    assert init.packed and init.packed_buffer_size_bytes == bucket_bytes and init.rank_offset == 1

    class FakeGroup:
        def __init__(self) -> None:
            self.sent = iter(buckets)

        def broadcast(self, tensor: torch.Tensor, src: int) -> None:
            assert src == 0
            flat = next(self.sent).flat
            assert tensor.numel() == flat.numel()  # the receiver cut the same bucket
            tensor.copy_(flat)

    class FakeStream:
        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(
        packed_tensor, "_get_streams", lambda _dev, n: tuple(FakeStream() for _ in range(n))
    )
    monkeypatch.setattr(torch.cuda, "stream", lambda _s: nullcontext())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    received: list[tuple[str, torch.Tensor]] = []
    meta = (
        (n, (shape, getattr(torch, d)))
        for n, d, shape in zip(update.names, update.dtype_names, update.shapes, strict=True)
    )
    packed_tensor.packed_nccl_broadcast_consumer(
        iterator=meta,
        group=FakeGroup(),
        src=0,
        post_unpack_func=lambda pairs: received.extend((n, t.clone()) for n, t in pairs),
        buffer_size_bytes=init.packed_buffer_size_bytes,
        num_buffers=init.packed_num_buffers,
        device="cpu",
    )
    assert len(buckets) == len(plan_buckets(specs, bucket_bytes)) > 1
    assert [n for n, _ in received] == [n for n, _ in named]
    for (_, got), (_, want) in zip(received, named, strict=True):
        assert torch.equal(got, want)

    # vLLM's producer-side packer cuts the same chunks, byte for byte.
    it = iter(named)
    chunks = []
    while (chunk := packed_tensor.pack_tensors(it, lambda item: item[1], bucket_bytes)) is not None:
        chunks.append(chunk.packed_tensor)
    assert len(chunks) == len(buckets)
    assert all(torch.equal(c, b.flat) for c, b in zip(chunks, buckets, strict=True))


class _Parallel:
    """The three `ParallelConfig` fields vLLM's rank formula reads."""

    def __init__(self, world_size: int, rank: int, data_parallel_index: int = 0) -> None:
        self.world_size, self.rank, self.data_parallel_index = world_size, rank, data_parallel_index


@pytest.mark.parametrize("engine_world_sizes", [[1], [1, 1], [2, 2], [1, 2, 1], [4, 1, 3]], ids=str)
def test_collective_plan_gives_every_engine_worker_its_own_rank(
    engine_world_sizes: list[int],
) -> None:
    """Engine i's workers (vLLM: rank_offset + dp*TP*PP + rank) fill 1..world_size-1 once each."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    from capo_dist.engines.gloo_weight_transfer import worker_rank

    specs = [ParamSpec("w", (2,), torch.float32)]
    plan = CollectiveTransport.plan(specs, 64, "127.0.0.1", 29600, engine_world_sizes)
    assert plan.world_size == 1 + sum(engine_world_sizes)
    ranks = []
    for info, n in zip(plan.init_infos, engine_world_sizes, strict=True):
        init = NCCLWeightTransferInitInfo(**info)  # vLLM accepts the payload as is
        assert init.world_size == plan.world_size
        ranks += [worker_rank(init, _Parallel(world_size=n, rank=r)) for r in range(n)]
    assert ranks == list(range(1, plan.world_size))  # distinct, contiguous, after learner rank 0


def test_rank_offsets_count_the_workers_of_earlier_engines() -> None:
    assert engine_rank_offsets([1, 1]) == [1, 2]
    assert engine_rank_offsets([2, 2]) == [1, 3]
    with pytest.raises(ValueError, match="at least one worker"):
        engine_rank_offsets([1, 0])


def test_a_restarted_engine_is_reloaded_on_the_collective_path_even_at_the_current_version():
    """Killed before the first sync, a restarted engine is at version 0 like the driver, but
    its new process is outside the weight-transfer group: on a collective transport it must
    be reloaded (and the run falls back to the object store), or the next broadcast hangs."""
    assert engines_to_reload([0, 0], [False, True], version=0, collective=True) == [1]
    assert engines_to_reload([0, 0], [False, True], version=0, collective=False) == []
    # Behind: an older version is reloaded on either transport.
    assert engines_to_reload([1, 0], [False, True], version=1, collective=False) == [1]
    assert engines_to_reload([1, 1], [False, False], version=1, collective=True) == []
