"""Collectives for 1-bit Adam over ``torch.distributed`` (gloo on CPU, NCCL on GPU), with byte counting.

The compressed all-reduce follows Tang et al. (2021) / DeepSpeed's ``compressed_allreduce``:

1. **worker**: ``x = buffer + worker_error``; every block of ``block_size`` elements is sent as its sign
   bits (packed 8 per byte) and one fp32 scale ``‖x_b‖₁ / d_b``; ``worker_error = x − decompress(x)``.
2. **reduce-scatter**: the padded buffer is cut into ``world_size`` equal chunks; rank ``r`` *serves*
   chunk ``r`` and receives every worker's compressed copy of it (``all_to_all_single``).
3. **server**: ``y = mean over workers of decompress(...) + server_error``; compressed again the same way,
   ``server_error = y − decompress(y)`` (only this rank's chunk of ``server_error`` is used).
4. **all-gather**: every rank gathers all served chunks (signs + scales) and decompresses them, so all
   ranks obtain the *same* tensor bit for bit.

Choices where paper and code disagree:

* **Scale = mean |x| of the block** (‖x_b‖₁/d, as in error-feedback signSGD, Karimireddy et al. 2019),
  not DeepSpeed's ‖x_b‖₂/√d. With the mean-|x| scale the compressed block is the least-squares
  projection of x_b onto its sign pattern: ‖x − C(x)‖² = ‖x‖² − ‖x‖₁²/d ≤ ‖x‖², a contraction, so the
  error buffers stay bounded. The RMS scale gives ‖x − C(x)‖² = 2‖x‖(‖x‖ − ‖x‖₁/√d), larger than ‖x‖²
  whenever the block is heavy-tailed (‖x‖₁ < √d·‖x‖/2: one large entry among small ones); it also
  spreads that entry's energy over all d coordinates. Measured in the benchmark setting (raw momentum,
  lr 1e-3): RMS scale diverged to NaN, mean-|x| scale trained normally (benchmarks/RESULTS.md).
* DeepSpeed used one scale per rank chunk of the whole flattened model. Here the scale is per block of
  ``block_size`` elements (``block_size=None`` gives DeepSpeed's one scale per chunk); with mixed tensors
  (norm weights next to embeddings) in one buffer, per-block scales keep the small ones from being
  swamped. The extra traffic is 4 bytes per block.

Padding: the buffer is zero-padded to a multiple of ``world_size * block_size`` (and of 8), so any
world size works. Bytes are counted per rank as the ``nbytes`` of every tensor handed to a collective
(what this rank puts on the wire with gloo); ``CommStats`` keeps the totals for benchmarks.

Without an initialised process group (and ``WORLD_SIZE`` unset or 1) a ``Communicator`` acts as a world
of one: collectives are the identity and send nothing, compression is still applied, so a single
process runs the same algorithm as a 1-rank group. With ``WORLD_SIZE > 1`` but no process group it
raises, since silently training unsynchronised replicas would be wrong.
"""

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CommStats", "Communicator", "Workspace", "local_gradients_hook", "pack_signs", "skip_host_allreduce", "unpack_signs"]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Sign bits of a 1-D tensor whose length is a multiple of 8 -> uint8 of length n/8 (bit 1 = x ≥ 0)."""
    if x.dim() != 1 or x.numel() % 8:
        raise ValueError(f"pack_signs needs a 1-D tensor with a multiple of 8 elements, got shape {tuple(x.shape)}")
    bits = torch.ge(x, 0)
    if bits.device.type == "cpu":  # numpy packs MSB first in one C pass: 25x faster than the arithmetic below
        return torch.from_numpy(np.packbits(bits.numpy()))
    bytes_ = bits.view(torch.uint8).view(-1, 8)  # a bool is one byte: 0 or 1
    return (bytes_ * _BIT_WEIGHTS.to(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: uint8 (n/8,) -> ±1 of length n in ``dtype`` (into ``out`` if given)."""
    # one lookup of each byte's 8 signs: a single pass that writes the output, where testing each
    # bit made four
    if out is None:
        out = torch.empty(packed.numel() * 8, dtype=dtype, device=packed.device)
    torch.index_select(_sign_table(dtype, packed.device), 0, packed.int(), out=out.view(-1, 8))
    return out


@functools.cache
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): the ±1 signs that byte value b packs, most significant bit first."""
    bits = (torch.arange(256, dtype=torch.uint8).unsqueeze(-1) & _BIT_WEIGHTS).ne(0)
    return bits.to(dtype).mul_(2).sub_(1).to(device)


def _compress(x: torch.Tensor, block: int, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,), n a multiple of ``block`` -> (packed signs (n/8,) uint8, scales (n/block,) fp32 = ‖x_b‖₁/block);
    ``scratch``: a buffer like ``x`` for |x|.

    The mean absolute value is the scale s minimising ‖x_b − s·sign(x_b)‖₂, so the compression error is
    never larger than ``x_b`` itself and error feedback stays bounded (see the module docstring).
    """
    scales = torch.abs(x, out=scratch).view(-1, block).mean(dim=1).float()
    return pack_signs(x), scales


def _decompress(packed: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """Signs times their block's scale, into ``out`` (n,)."""
    signs = unpack_signs(packed, out.dtype, out).view(-1, block)
    return signs.mul_(scales.to(out.dtype).unsqueeze(1)).view(-1)


class Workspace:
    """Buffers reused from step to step on CPU, one per name and size. There a fresh large tensor is
    paid for in page faults each time it is touched (glibc maps big blocks afresh for every
    allocation): with fresh buffers these faults were two thirds of a compressed step. Elsewhere
    (CUDA) the caching allocator already reuses freed blocks, so nothing is held between steps."""

    def __init__(self):
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The buffer ``name`` of ``numel`` elements, with ``like``'s dtype and device (contents undefined)."""
        if like.device.type != "cpu":
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        buf = self._buffers.get((name, numel))
        if buf is None or buf.dtype != like.dtype:
            stale = [key for key in self._buffers if key[0] == name]  # LISA changed the layers: a new size
            for key in stale:
                del self._buffers[key]
            buf = self._buffers[name, numel] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf


@dataclass
class CommStats:
    """Bytes handed to collectives by this rank, per kind (``"fp32"``: full-precision all-reduce,
    ``"compressed"``: the 1-bit all-reduce) and the number of collective calls."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: {"fp32": 0, "compressed": 0})
    calls: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def add(self, kind: str, *tensors: torch.Tensor) -> None:
        self.bytes_sent[kind] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls += len(tensors)


class Communicator:
    """Full-precision and error-compensated 1-bit averaging over a process group, counting bytes."""

    def __init__(self, group: dist.ProcessGroup | None = None, block_size: int | None = 1024):
        if block_size is not None and (block_size < 8 or block_size % 8):
            raise ValueError(f"block_size must be a positive multiple of 8 (or None for one scale per chunk), got {block_size}")
        self.distributed = dist.is_available() and dist.is_initialized()
        if not self.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (or deepspeed.init_distributed) before building the optimizer"
            )
        self.group = group
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.block_size = block_size
        self.stats = CommStats()
        self.workspace = Workspace()

    # -- full precision ----------------------------------------------------------------------
    def all_reduce_mean(self, flat: torch.Tensor) -> torch.Tensor:
        """In-place average of ``flat`` over ranks (sum all-reduce, then / world size)."""
        if self.world_size > 1:
            self.stats.add("fp32", flat)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
        return flat

    # -- 1 bit ---------------------------------------------------------------------------------
    def padded_length(self, n: int) -> tuple[int, int]:
        """(padded length, block) for a buffer of n elements: whole blocks per rank chunk."""
        if self.block_size is None:
            chunk = -(-n // (8 * self.world_size)) * 8
            return chunk * self.world_size, chunk
        blocks_per_rank = -(-n // (self.block_size * self.world_size))
        return blocks_per_rank * self.block_size * self.world_size, self.block_size

    def compressed_all_reduce(
        self, buffer: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor
    ) -> torch.Tensor:
        """Error-compensated 1-bit average of ``buffer`` over ranks.

        Args:
            buffer: (n,) this rank's values, n = ``padded_length(...)[0]`` (zero-pad before calling);
                overwritten (with buffer + worker_error).
            worker_error: (n,) this rank's worker compression error; updated in place.
            server_error: (n,) server error; only this rank's chunk ``[rank·n/W, (rank+1)·n/W)`` is
                read and updated in place.
        Returns:
            (n,) the compressed average, identical on every rank: a buffer of this communicator,
            valid until its next call.
        """
        n, world = buffer.numel(), self.world_size
        padded, block = self.padded_length(n)
        if padded != n:
            raise ValueError(f"buffer length {n} is not padded; expected {padded} (see padded_length)")
        chunk, space = n // world, self.workspace
        x = buffer.add_(worker_error)
        decompressed = space.get("decompressed", n, x)  # |x|, then C(x), then the result
        signs, scales = _compress(x, block, decompressed)
        torch.sub(x, _decompress(signs, scales, block, decompressed), out=worker_error)

        got_signs, got_scales = self._exchange(signs, scales)  # (world, chunk/8), (world, chunk/block)
        mine = slice(self.rank * chunk, (self.rank + 1) * chunk)
        received = space.get("received", n, x).view(world, chunk)
        for row, s, c in zip(received, got_signs, got_scales):
            _decompress(s, c, block, row)
        y = torch.mean(received, dim=0, out=space.get("served", chunk, x))
        y.add_(server_error[mine])
        served = space.get("served_decompressed", chunk, x)
        served_signs, served_scales = _compress(y, block, served)
        torch.sub(y, _decompress(served_signs, served_scales, block, served), out=server_error[mine])

        all_signs, all_scales = self._gather(served_signs, served_scales)
        return _decompress(all_signs, all_scales, block, decompressed)

    def _exchange(self, signs: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce-scatter step: rank r receives every rank's compressed chunk r."""
        world = self.world_size
        if world == 1:
            return signs.view(1, -1), scales.view(1, -1)
        self.stats.add("compressed", signs, scales)
        got_signs, got_scales = torch.empty_like(signs), torch.empty_like(scales)
        dist.all_to_all_single(got_signs, signs, group=self.group)
        dist.all_to_all_single(got_scales, scales, group=self.group)
        return got_signs.view(world, -1), got_scales.view(world, -1)

    def _gather(self, signs: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather step: every rank obtains all served chunks, in rank order."""
        if self.world_size == 1:
            return signs, scales
        self.stats.add("compressed", signs, scales)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        all_signs = signs.new_empty(signs.numel() * self.world_size)
        all_scales = scales.new_empty(scales.numel() * self.world_size)
        gather(all_signs, signs, group=self.group)
        gather(all_scales, scales, group=self.group)
        return all_signs, all_scales


# -- switching off the host's gradient all-reduce ---------------------------------------------------
def local_gradients_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that sends nothing: DDP hands back each rank's local gradients.

    OneBitAdam averages gradients itself (fp32 during warm-up, 1-bit momentum afterwards), so DDP's
    all-reduce would only double the traffic (averaging twice gives the same numbers).
    """
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def skip_host_allreduce(wrapped) -> None:
    """Switch off the gradient all-reduce of a DDP module or a DeepSpeed engine.

    DDP: registers :func:`local_gradients_hook` (before the first backward). DeepSpeed: clears the
    engine's ``enable_backward_allreduce`` flag, the switch DeepSpeed's own 1-bit optimizers used;
    the engine must run ZeRO stage 0 with its bf16/fp16 modes off.
    """
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.register_comm_hook(state=None, hook=local_gradients_hook)
    elif hasattr(wrapped, "enable_backward_allreduce"):
        if wrapped.zero_optimization_stage() != 0:
            raise ValueError(
                f"OneBitAdam needs DeepSpeed ZeRO stage 0, the engine has stage {wrapped.zero_optimization_stage()}: "
                "ZeRO partitions the gradient reduction that OneBitAdam replaces"
            )
        if wrapped.bfloat16_enabled() or wrapped.fp16_enabled():
            raise ValueError(
                "OneBitAdam needs DeepSpeed's bf16/fp16 off: DeepSpeed then hands OneBitAdam fp32 master copies, "
                "and the copies of layers LISA froze kept moving (measured). Load the model in bf16 instead "
                "(recipe model.dtype: bfloat16; OneBitAdam keeps fp32 state over bf16 weights) with onebit_zero0.json"
            )
        wrapped.enable_backward_allreduce = False
    else:
        raise TypeError(f"expected a DistributedDataParallel module or a DeepSpeed engine, got {type(wrapped).__name__}")
