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
that stream while the current layer recomputes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_ulysses.model_utils import is_checkpointing


@dataclass
class OffloadStats:
    """What the hooks did in the current/last step (reset at every forward)."""

    offloaded: int = 0
    restored: int = 0
    offloaded_bytes: int = 0
    stored: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # (shape, device of the stored copy)


class _Offloaded:
    __slots__ = ("host", "device", "ready", "prefetched", "index", "__weakref__")

    def __init__(self, host: Tensor, device: torch.device, ready: Optional[Any], index: int) -> None:
        self.host = host
        self.device = device
        self.ready = ready  # CUDA event: D2H copy finished
        self.prefetched: Optional[tuple[Tensor, Any]] = None
        self.index = index


class ActivationOffloader:
    """The pack/unpack pair and its bookkeeping, for one model."""

    def __init__(self, hidden_size: int, min_bytes: int = 0) -> None:
        self.hidden_size = hidden_size
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        # weak: a record lives exactly as long as the autograd graph that saved it (a forward whose
        # graph is dropped without backward must not keep host copies alive)
        self._records: list[weakref.ref] = []
        self._stream: Optional[torch.cuda.Stream] = None
        self._pool: dict[tuple, list[tuple[Tensor, Any]]] = {}
        self._context: Optional[torch.autograd.graph.saved_tensors_hooks] = None

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
    def _host_buffer(self, t: Tensor) -> Tensor:
        if not t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, device="cpu")
        key = (tuple(t.shape), t.dtype)
        free = self._pool.get(key)
        if free:
            buf, last_use = free.pop()
            if last_use is not None:
                last_use.synchronize()  # its previous H2D copy must be done before we overwrite it
            return buf
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)

    def _release(self, rec: _Offloaded, last_use: Optional[Any]) -> None:
        if rec.host is not None and rec.host.is_pinned():
            self._pool.setdefault((tuple(rec.host.shape), rec.host.dtype), []).append((rec.host, last_use))
        rec.host = None

    # ------------------------------------------------------------------------------ hooks
    def pack(self, t: Tensor) -> Any:
        if not self.wants(t):
            return t
        host = self._host_buffer(t)
        ready = None
        if t.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=t.device)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            t.record_stream(self._stream)  # keep t's memory until the copy has read it
        else:
            host.copy_(t)
        rec = _Offloaded(host, t.device, ready, len(self._records))
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
        self._release(rec, done)
        self.stats.restored += 1
        # backward visits layers in reverse: start bringing back the one before while this one recomputes
        if rec.device.type == "cuda" and 0 < rec.index <= len(self._records):
            prev = self._records[rec.index - 1]()
            if prev is not None and prev.host is not None and prev.prefetched is None:
                prev.prefetched = self._to_device(prev)
        return out

    # ---------------------------------------------------------------------- module hooks
    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and is_checkpointing(module)):
            return
        self._records = []  # a new step: indices restart (records of a live older graph still work)
        self.stats = OffloadStats()
        self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._context.__enter__()

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


_ATTR = "_lightning_ulysses_offload"


def enable_activation_offload(model: torch.nn.Module, min_bytes: int = 0) -> ActivationOffloader:
    """Offload ``model``'s checkpointed layer inputs to CPU (idempotent; needs gradient checkpointing on)."""
    disable_activation_offload(model)
    decoder = getattr(model, "base_model", model)
    hidden = model.config.get_text_config().hidden_size
    offloader = ActivationOffloader(hidden, min_bytes)
    handles = [
        decoder.register_forward_pre_hook(offloader._enter),
        decoder.register_forward_hook(offloader._exit, always_call=True),
    ]
    setattr(model, _ATTR, (offloader, handles))
    return offloader


def disable_activation_offload(model: torch.nn.Module) -> None:
    state = getattr(model, _ATTR, None)
    if state is not None:
        for h in state[1]:
            h.remove()
        delattr(model, _ATTR)


def activation_offloader(model: torch.nn.Module) -> Optional[ActivationOffloader]:
    state = getattr(model, _ATTR, None)
    return state[0] if state is not None else None


__all__ = [
    "ActivationOffloader",
    "OffloadStats",
    "activation_offloader",
    "disable_activation_offload",
    "enable_activation_offload",
]
