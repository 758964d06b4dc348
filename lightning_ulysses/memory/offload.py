"""Activation-checkpoint CPU offload: checkpointed layer inputs wait for backward in host memory.

With gradient checkpointing, what stays on the GPU between forward and backward is each layer's input
``[b, c, hidden]`` (everything else is recomputed): ``num_layers`` of them, so memory grows with depth.
This module moves them to (pinned) CPU memory right after they are saved and brings each one back
when its layer is recomputed; a restored input lives only while its layer's backward runs, so
activation memory no longer grows with depth.

How the right tensors are found, without marking tensors by identity (under ZeRO-3 the tensor a
hook marked is not the one checkpoint saves): a ``saved_tensors_hooks`` context is open while the
decoder stack (``model.base_model``) runs forward. Inside a checkpointed layer, torch's own checkpoint
hooks are innermost and take every saved tensor; the only tensors *our* hooks see are what checkpoint
saves for the recompute (the layer inputs) and what the few non-checkpointed ops between layers save.
Of those we offload floating tensors whose last dimension is the hidden size.

Known limit: a *training-mode, grad-enabled* forward that is never backpropagated keeps its host
copies (torch's non-reentrant checkpoint keeps inputs packed by outer saved-tensor hooks alive, with
plain tensors as well); run such forwards under ``torch.no_grad()`` (Lightning's eval loops do).

On CUDA the device-to-host copies run on a side stream (``record_stream`` keeps the GPU memory until
the copy is done, so compute never waits), and in backward the next layer's input is prefetched on
that stream. *When*: as soon as the current layer's attention backward is done, not when the layer's
backward starts. The attention backward is the peak of a layer's backward (measured at 128K tokens on
H200), so a prefetched input there costs one ``[tokens, hidden]`` activation of peak memory; after it,
the q/k/v projection backward GEMMs still hide the copy. The trigger is an identity autograd node on
each layer's query projection output (inserted in the original forward only; under non-reentrant
checkpointing that is the graph backward walks, and it saves nothing, so recompute is unaffected).
Models without a ``self_attn.q_proj`` fall back to prefetching when the layer's input is restored.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_ulysses.memory.activation_checkpoint import decoder_layers
from lightning_ulysses.memory.activation_checkpoint import (
    disable_gradient_checkpointing, enable_gradient_checkpointing, is_checkpointing,
)
from lightning_ulysses.memory.module_swap import settings
from lightning_ulysses.memory.trick import MemoryTrick


@dataclass
class OffloadStats:
    """What the hooks did in the current/last step (reset at every forward)."""

    offloaded: int = 0
    kept: int = 0  # wanted tensors left on the device (``keep_layers``)
    restored: int = 0
    offloaded_bytes: int = 0
    prefetch_points: int = 0  # times a layer's attention backward asked for the previous layer's input
    stored: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # (shape, device of the stored copy)


class PinnedBuffer:
    """``nbytes`` of host memory, page-locked with ``cudaHostRegister`` (``registered``) or plain.

    Why not ``torch.empty(..., pin_memory=True)``: torch's pinned allocator (``CachingHostAllocator``)
    rounds every request up to a power of two, so a layer input of 2.1 GiB would hold 4 GiB of host RAM,
    which at millions of tokens is what ends the sequence (32 such inputs per rank for Llama-3-8B).
    Registering an ordinary allocation pins exactly what is asked (torch stages checkpoints the same way)."""

    __slots__ = ("data", "registered", "pending", "_raw")

    _PAGE = 4096

    def __init__(self, nbytes: int, pin: bool = True) -> None:
        self.registered = False
        self.pending: Optional[Any] = None  # CUDA event of the last async copy that reads or writes it
        self._raw = torch.empty(nbytes + (self._PAGE if pin else 0), dtype=torch.uint8)
        start = (-self._raw.data_ptr()) % self._PAGE if pin else 0
        self.data = self._raw[start:start + nbytes]  # page-aligned: any dtype can view it
        if pin:
            # flag 1 = cudaHostRegisterPortable (pinned for every CUDA context, like torch's own staging)
            if int(torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), nbytes, 1)) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (host RAM, or ulimit -l)")
            self.registered = True

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        return self.data[:n].view(dtype).view(shape)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None

    def __del__(self) -> None:
        # torch's pinned allocator keeps a block until the copies recorded on it finish; ours must wait
        # itself (a graph dropped without backward frees its records while a D2H copy may be in flight)
        try:
            self.wait()
            if self.registered:
                torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class HostBufferPool:
    """Free host buffers for offloaded inputs, reused for any shape that fits (smallest that fits).

    A pool keyed by shape keeps one set of buffers per sequence length it has seen, which with
    variable-length data grows host RAM without bound. Here, when no free buffer fits, the smallest free
    one is let go before a new one is made: the pool never holds more buffers than were in use at once
    (one step's offloaded inputs), none larger than the longest input so far."""

    def __init__(self, allocate: Callable[[int], PinnedBuffer] = PinnedBuffer) -> None:
        self._allocate = allocate
        self._free: list[PinnedBuffer] = []

    def take(self, nbytes: int) -> PinnedBuffer:
        fits = [b for b in self._free if b.nbytes >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: b.nbytes)
            self._free.remove(buf)
            buf.wait()  # its previous H2D copy must be done before it is overwritten
            return buf
        if self._free:  # all too small (longer sequences now): the smallest goes (waits in __del__)
            self._free.remove(min(self._free, key=lambda b: b.nbytes))
        return self._allocate(nbytes)

    def give(self, buf: PinnedBuffer) -> None:
        self._free.append(buf)

    @property
    def free_bytes(self) -> list[int]:
        return sorted(b.nbytes for b in self._free)


class _Offloaded:
    __slots__ = ("host", "buffer", "device", "ready", "prefetched", "index", "__weakref__")

    def __init__(self, host: Tensor, buffer: Optional[PinnedBuffer], device: torch.device, ready: Optional[Any],
                 index: int) -> None:
        self.host = host
        self.buffer = buffer  # the pool's buffer behind ``host`` (CUDA only)
        self.device = device
        self.ready = ready  # CUDA event: D2H copy finished
        self.prefetched: Optional[tuple[Tensor, Any]] = None
        self.index = index


def check_keep_layers(value: int, name: str = "keep_layers") -> None:
    """The one validation of how many layer inputs stay on the GPU (the offloader and its trick share it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} (layer inputs left on the GPU) must be >= 0, got {value!r}.")


class ActivationOffloader:
    """The pack/unpack pair and its bookkeeping, for one model."""

    def __init__(self, hidden_size: int, min_bytes: int = 0, keep_layers: int = 0) -> None:
        check_keep_layers(keep_layers)
        self.hidden_size = hidden_size
        self.min_bytes = min_bytes
        # the first keep_layers layer inputs of each forward stay where they are: when host RAM, not GPU
        # memory, is the limit (every offloaded input costs 2 * hidden bytes per token of pinned memory, and
        # the ranks of a node share it), spare GPU memory holds some of them. Which ones does not change the
        # peak (backward starts with all of them live either way); the first ones are the last restored, so
        # the offloaded remainder keeps its prefetch order.
        self.keep_layers = keep_layers
        self._kept = 0
        self.stats = OffloadStats()
        # weak: a record lives exactly as long as the autograd graph that saved it (a forward whose
        # graph is dropped without backward must not keep host copies alive)
        self._records: list[weakref.ref] = []
        self._stream: Optional[torch.cuda.Stream] = None
        self._pool = HostBufferPool()
        self._context: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._last_restored: Optional[_Offloaded] = None
        self.prefetch_after_attention = False  # set when the q_proj trigger points are installed

    # ------------------------------------------------------------------------------ policy
    def wants(self, t: Tensor) -> bool:
        return (
            t.is_floating_point()
            and t.dim() >= 2
            and t.shape[-1] == self.hidden_size
            and t.numel() * t.element_size() >= self.min_bytes
            and not isinstance(t, torch.nn.Parameter)
        )

    @property
    def live_records(self) -> int:
        return sum(1 for ref in self._records if (r := ref()) is not None and r.host is not None)

    # --------------------------------------------------------------------------- host pool
    def _host_buffer(self, t: Tensor) -> tuple[Tensor, Optional[PinnedBuffer]]:
        if not t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, device="cpu"), None
        buf = self._pool.take(t.numel() * t.element_size())
        return buf.view(tuple(t.shape), t.dtype), buf

    def _release(self, rec: _Offloaded) -> None:
        if rec.buffer is not None:  # its H2D copy is the buffer's pending event (set in _to_device)
            self._pool.give(rec.buffer)
        rec.host = rec.buffer = None

    # ------------------------------------------------------------------------------ hooks
    def pack(self, t: Tensor) -> Any:
        if not self.wants(t):
            return t
        if self._kept < self.keep_layers:
            self._kept += 1
            self.stats.kept += 1
            self.stats.stored.append((tuple(t.shape), str(t.device)))
            return t
        host, buffer = self._host_buffer(t)
        ready = None
        if t.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=t.device)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            buffer.pending = ready
            t.record_stream(self._stream)  # keep t's memory until the copy has read it
        else:
            host.copy_(t)
        rec = _Offloaded(host, buffer, t.device, ready, len(self._records))
        self._records.append(weakref.ref(rec))
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += t.numel() * t.element_size()
        self.stats.stored.append((tuple(host.shape), str(host.device)))
        return rec

    def _to_device(self, rec: _Offloaded) -> tuple[Tensor, Optional[Any]]:
        if rec.device.type != "cuda":
            return rec.host.to(rec.device, copy=True), None
        stream = self._stream
        with torch.cuda.stream(stream):
            stream.wait_event(rec.ready)
            out = rec.host.to(rec.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        if rec.buffer is not None:
            rec.buffer.pending = done
        return out, done

    def unpack(self, packed: Any) -> Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        rec = packed
        if rec.prefetched is not None:
            out, done = rec.prefetched
            rec.prefetched = None
        else:
            out, done = self._to_device(rec)
        if done is not None:
            torch.cuda.current_stream(rec.device).wait_event(done)
            out.record_stream(torch.cuda.current_stream(rec.device))
        self._release(rec)
        self.stats.restored += 1
        self._last_restored = rec
        if not self.prefetch_after_attention:
            self._prefetch_before(rec)
        return out

    def _prefetch_before(self, rec: _Offloaded) -> None:
        """Start bringing back the input saved just before ``rec`` (backward visits layers in reverse)."""
        if rec.device.type == "cuda" and 0 < rec.index <= len(self._records):
            prev = self._records[rec.index - 1]()
            if prev is not None and prev.host is not None and prev.prefetched is None:
                prev.prefetched = self._to_device(prev)

    def prefetch_point(self) -> None:
        """Called from backward once a layer's attention gradient is done (see the module docstring)."""
        self.stats.prefetch_points += 1
        if self._last_restored is not None:
            self._prefetch_before(self._last_restored)

    def _mark(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        # original forward only (our hooks' context is open): the recompute's graph is never walked
        if self._context is not None and isinstance(output, Tensor) and output.requires_grad:
            return _PrefetchPoint.apply(output, self)
        return None

    # ---------------------------------------------------------------------- module hooks
    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and is_checkpointing(module)):
            return
        self._records = []  # a new step: indices restart (records of a live older graph still work)
        self._kept = 0
        self._last_restored = None
        self.stats = OffloadStats()
        self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._context.__enter__()

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


class _PrefetchPoint(torch.autograd.Function):
    """Identity in forward; in backward (after the attention that consumed it) asks for the next input."""

    @staticmethod
    def forward(ctx, x: Tensor, offloader: ActivationOffloader) -> Tensor:
        ctx.offloader = offloader
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.offloader.prefetch_point()
        return grad, None


def _query_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's ``self_attn.q_proj``, or [] if some layer has none (then: early prefetch)."""
    projs = [getattr(getattr(layer, "self_attn", None), "q_proj", None) for layer in decoder_layers(model)]
    return projs if projs and all(isinstance(p, torch.nn.Module) for p in projs) else []


_STATE = "offload"  # settings(model) key: (offloader, hook handles)


def enable_activation_offload(model: torch.nn.Module, min_bytes: int = 0, keep_layers: int = 0) -> ActivationOffloader:
    """Offload ``model``'s checkpointed layer inputs to CPU (idempotent; needs gradient checkpointing on).

    ``keep_layers``: this many layer inputs (the first layers') stay on the GPU, for when host RAM ends the
    sequence before GPU memory does."""
    layers = len(decoder_layers(model))
    if keep_layers and keep_layers >= layers:
        raise ValueError(
            f"activation_checkpoint_cpu_offload_keep_layers={keep_layers} keeps every one of {type(model).__name__}'s "
            f"{layers} decoder layer inputs on the GPU, so the offload would move nothing: use keep_layers < {layers}, "
            "or turn the offload off (activation_checkpoint_cpu_offload=False)."
        )
    disable_activation_offload(model)
    decoder = getattr(model, "base_model", model)
    hidden = model.config.get_text_config().hidden_size
    offloader = ActivationOffloader(hidden, min_bytes, keep_layers)
    handles = [
        decoder.register_forward_pre_hook(offloader._enter),
        decoder.register_forward_hook(offloader._exit, always_call=True),
    ]
    projections = _query_projections(model)
    handles += [proj.register_forward_hook(offloader._mark) for proj in projections]
    offloader.prefetch_after_attention = bool(projections)
    settings(model)[_STATE] = (offloader, handles)
    return offloader


def disable_activation_offload(model: torch.nn.Module) -> None:
    state = settings(model).pop(_STATE, None)
    if state is not None:
        for h in state[1]:
            h.remove()


def activation_offloader(model: torch.nn.Module) -> Optional[ActivationOffloader]:
    state = settings(model).get(_STATE)
    return state[0] if state is not None else None


class ActivationOffload(MemoryTrick):
    """Checkpointed layer inputs wait for backward in CPU memory (this module's docstring says how).

    Turns gradient checkpointing on if it is off (there is nothing to offload without it); a policy
    already chosen (``save_attention``) is kept.

    Args:
        min_bytes: smaller layer inputs stay on the GPU.
        keep_layers: the first this many layer inputs stay on the GPU (host RAM is shared by a node's ranks
            and can end the sequence before GPU memory does; each kept input moves ``2 * hidden`` bytes per
            local token from host to GPU memory).
    """

    order = 70  # last: it hooks the checkpointed stack as the other tricks left it
    flag = "activation_checkpoint_cpu_offload"
    flag_options = {"activation_checkpoint_cpu_offload_keep_layers": "keep_layers"}
    needs_flag = "gradient_checkpointing"

    def __init__(self, min_bytes: int = 0, keep_layers: int = 0) -> None:
        check_keep_layers(keep_layers)
        self.min_bytes = min_bytes
        self.keep_layers = keep_layers

    def apply(self, model: torch.nn.Module) -> None:
        if not is_checkpointing(model):
            settings(model)["offload_enabled_checkpointing"] = True  # remove() turns it off again
        enable_gradient_checkpointing(model)
        if activation_offloader(model) is None:
            enable_activation_offload(model, self.min_bytes, self.keep_layers)

    def remove(self, model: torch.nn.Module) -> None:
        disable_activation_offload(model)
        if settings(model).pop("offload_enabled_checkpointing", False):
            disable_gradient_checkpointing(model)


__all__ = [
    "ActivationOffload",
    "ActivationOffloader",
    "HostBufferPool",
    "PinnedBuffer",
    "check_keep_layers",
    "OffloadStats",
    "activation_offloader",
    "disable_activation_offload",
    "enable_activation_offload",
]
