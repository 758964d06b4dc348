"""Ring attention: exact causal attention over a sequence split across a ring of ranks.

Each of the ``R`` ranks of a ring group holds queries, keys and values for its own part of the
sequence (after the Ulysses all-to-all, when nested in it: ``[b, h_local, S/R, d]``). K/V blocks
travel around the ring (``R - 1`` point-to-point hops, the next hop started before the current block
is computed so the transfer hides behind it); each rank attends its queries to every block it may
see and merges the partial outputs with their log-sum-exp::

    lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Backward replays the ring: dQ accumulates locally, dK/dV accumulators travel *with* the K/V block
and arrive back at its owner after ``R`` hops. Block gradients use the *final* output and
log-sum-exp (softmax of a block against the global normaliser), which is what makes them exact.

Layouts (:func:`lightning_ulysses.parallel.sharding.shard_token_index` shards the data the same way):

* contiguous: rank ``i`` holds chunk ``i``. Causal work is unbalanced (the last rank does ``R``
  blocks, the first one).
* zigzag: rank ``i`` holds chunks ``i`` and ``2R-1-i`` of ``2R``. Step 0 is causal over the local
  (increasing) positions; a block from an earlier rank ``j < i`` is seen in full by all local
  queries but only its first half (chunk ``j``; chunk ``2R-1-j`` is later than both of ours); a
  block from a later rank ``j > i`` is seen in full by our second half only. Every rank then
  computes the same amount: one causal block plus ``R - 1`` half-size blocks.

Packed rows (several samples per row, ``segments``: the ``[b, S]`` sample id of every token of the whole
sequence): a token attends only to earlier tokens of its own sample. Samples are contiguous in the sequence and
each rank's local order is increasing in it, so inside every (query rows, K/V block) pair of the plan the tokens
of one sample form one contiguous run on each side; the pair becomes one kernel call per sample present on both
sides (same causal flag as the pair), each writing only its own query rows. No mask is built, and a query row
with no visible key in a block simply receives nothing from it. Only the causal step-0 block holds many runs (a
later block shares at most the sample or two that cross a shard border), and there short runs are batched: padded
at their end to a common length and attended in one causal call per length bucket (:class:`_Batched`), so a rank
holding thousands of short samples makes tens of kernel calls, not thousands.

The block kernels (:mod:`lightning_ulysses.kernels.attention`) return the log-sum-exp and take it back
in backward: torch's cuDNN / flash SDPA ops on CUDA, the flash CPU op on CPU, a matmul fallback otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.kernels.attention import KERNEL_BACKENDS, AttentionKernel, expand_kv, reduce_kv, select_kernel

RING_BACKENDS = KERNEL_BACKENDS


# ------------------------------------------------------------------------------------------ the ring
@dataclass
class RingGroup:
    """A ring process group as seen from one rank."""

    group: dist.ProcessGroup
    size: int
    rank: int
    next_rank: int  # global ranks of the neighbours
    prev_rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> "RingGroup":
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return cls(
            group=group,
            size=size,
            rank=rank,
            next_rank=dist.get_global_rank(group, (rank + 1) % size),
            prev_rank=dist.get_global_rank(group, (rank - 1) % size),
        )

    def shift(self, send: Tensor) -> tuple[Tensor, list]:
        """Start sending ``send`` to the next rank and receiving the previous rank's into a new buffer."""
        if self.size == 1:  # a ring of one: what would travel is already where it goes
            return send, []
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next_rank, self.group),
            dist.P2POp(dist.irecv, recv, self.prev_rank, self.group),
        ]
        return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _blocks(step: int, rank: int, size: int, zigzag: bool, s: int) -> Optional[tuple[slice, slice, bool]]:
    """Which local query rows attend to which rows of the block held at ``step``: (q rows, kv rows, causal)."""
    full = slice(0, s)
    if step == 0:
        return full, full, True
    src = (rank - step) % size
    if zigzag:
        half = s // 2
        return (full, slice(0, half), False) if src < rank else (slice(half, s), full, False)
    return (full, full, False) if src < rank else None


def _ring_steps(kv: Tensor, ring: RingGroup, zigzag: bool, s: int):
    """Yield ``(kv block held, plan)`` per ring step; the next block's transfer runs during the caller's work."""
    for step in range(ring.size):
        if step < ring.size - 1:
            next_kv, works = ring.shift(kv)
        yield kv, _blocks(step, ring.rank, ring.size, zigzag, s)
        if step < ring.size - 1:
            _wait(works)
            kv = next_kv


def _runs(ids: Tensor, part: slice) -> dict[int, tuple[int, int]]:
    """``{sample id: (start, end)}`` of the contiguous runs of ``ids[part]`` (host ``[s]``; indices into ``ids``).
    Vectorised: one pass over the tokens in torch, a Python step per run only."""
    seg = ids[part]
    starts = torch.ones(seg.shape[0], dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    first = starts.nonzero().flatten().tolist()
    ends = first[1:] + [seg.shape[0]]
    values = seg[first].tolist()
    return {v: (part.start + a, part.start + b) for v, a, b in zip(values, first, ends)}


# Runs shorter than this in a causal block are batched (:class:`_Batched`); a longer run gets its own call. One
# batched call holds at most BATCH_TOKENS (padded) tokens: its gathered copies and fp32 gradient temporaries are
# transient per call, so this bounds them (measured: one call over a whole 32K-token rank added ~3 GiB of peak).
BATCH_RUNS_BELOW = 2048
BATCH_TOKENS = 8192


def _bucket(n: int) -> int:
    """Padded length of a run of ``n`` tokens: the next multiple of a quarter of ``n``'s power of two (at most 25%
    padding, so at most ~1.6x the run's attention work; four buckets per octave)."""
    step = max(1, (1 << (n.bit_length() - 1)) // 4)
    return -(-n // step) * step


@dataclass
class _Batched:
    """Runs of one padded length ``L`` (from any batch rows) attended as one ``[n, h, L, d]`` causal kernel call.

    Each run is padded at its *end* by repeating its last token: under the causal mask no real query sees a later
    position, so the padding changes no real output; padded query rows are dropped, and in backward get a zero
    upstream gradient (so they add nothing to any dq/dk/dv) and a finite lse (their copy's)."""

    rows: Tensor  # [n, 1] batch row of each run
    pos: Tensor  # [n, L] local position of each (padded) token
    valid: Tensor  # [n, L] True for real tokens

    @classmethod
    def of(cls, runs: list[tuple[int, int, int]], length: int, device: torch.device) -> "_Batched":
        rows, starts, ends = (torch.tensor(c, device=device) for c in zip(*runs))
        offsets = torch.arange(length, device=device)
        pos = torch.minimum(starts[:, None] + offsets, ends[:, None] - 1)
        return cls(rows[:, None], pos, offsets[None, :] < (ends - starts)[:, None])

    def take(self, t: Tensor) -> Tensor:
        """``[b, h, s, ...]`` -> ``[n, h, L, ...]`` (a copy)."""
        return t[self.rows, :, self.pos].transpose(1, 2).contiguous()  # advanced indices first: [n, L, h, ...]

    def real(self, t: Tensor) -> Tensor:
        """``[n, h, L, ...]`` -> the real tokens' ``[m, h, ...]``, in the order of :meth:`index`."""
        return t.transpose(1, 2)[self.valid]

    def index(self) -> tuple[Tensor, Tensor]:
        """(batch row, local position) of every real token: index ``[b, h, s, ...]`` tensors with ``[r, :, p]``."""
        return self.rows.expand_as(self.pos)[self.valid], self.pos[self.valid]


def _calls(plan: tuple[slice, slice, bool], src: int, local_ids: Optional[list], b: int, device: torch.device) -> list:
    """The kernel calls of one (query rows, K/V block) pair: ``(batch rows, q rows, kv cols)`` slices, or
    :class:`_Batched` runs. Without packed samples one call over the whole batch; with them one per batch row and
    sample present on both sides, except short runs of a causal block, batched per padded length."""
    rows, cols, causal = plan
    if local_ids is None:
        return [(slice(0, b), rows, cols)]
    calls: list = []
    short: dict[int, list[tuple[int, int, int]]] = {}  # padded length -> (batch row, start, end)
    for i in range(b):
        q_runs, k_runs = _runs(local_ids[-1][i], rows), _runs(local_ids[src][i], cols)
        for sample, (qa, qb) in q_runs.items():
            if sample not in k_runs:
                continue
            ka, kb = k_runs[sample]
            if causal and (qa, qb) == (ka, kb) and qb - qa < BATCH_RUNS_BELOW:
                short.setdefault(_bucket(qb - qa), []).append((i, qa, qb))
            else:
                calls.append((slice(i, i + 1), slice(qa, qb), slice(ka, kb)))
    for length, runs in sorted(short.items()):
        per_call = max(1, BATCH_TOKENS // length)
        for part in (runs[j : j + per_call] for j in range(0, len(runs), per_call)):
            if len(part) == 1:  # alone: no padding needed
                i, a, e = part[0]
                calls.append((slice(i, i + 1), slice(a, e), slice(a, e)))
            else:
                calls.append(_Batched.of(part, length, device))
    return calls


def local_sample_ids(segments: Tensor, ring: int, rank: int, zigzag: bool) -> list:
    """Per ring rank (and, last, this rank) the ``[b, s]`` sample ids of its tokens in local order (host tensors;
    one device-to-host copy)."""
    from lightning_ulysses.parallel.sharding import ring_token_index

    index = ring_token_index(segments.shape[1], ring, zigzag)
    host = segments.cpu()
    by_rank = [host[:, index[r]] for r in range(ring)]
    return by_rank + [by_rank[rank]]


def _kv_block(kv: Tensor, cols: slice, groups: int) -> tuple[Tensor, Tensor]:
    return expand_kv(kv[0][:, :, cols], groups).contiguous(), expand_kv(kv[1][:, :, cols], groups).contiguous()


def _merge(out: Tensor, lse: Tensor, rows: slice, o: Tensor, l: Tensor, batch: slice = slice(None)) -> None:
    """In place: fold block result (o, l) into the running (out fp32, lse) for query ``rows`` of ``batch``."""
    old = lse[batch, :, rows]
    new = torch.logaddexp(old, l)
    out[batch, :, rows] = out[batch, :, rows] * torch.exp(old - new)[..., None] + o.float() * torch.exp(l - new)[..., None]
    lse[batch, :, rows] = new


def _merge_batched(out: Tensor, lse: Tensor, call: _Batched, o: Tensor, l: Tensor) -> None:
    """:func:`_merge` for a :class:`_Batched` call: only its real tokens, scattered back to their rows."""
    r, p = call.index()
    o_real, l_real = call.real(o).float(), call.real(l)  # [m, h, d], [m, h]
    old = lse[r, :, p]
    new = torch.logaddexp(old, l_real)
    out[r, :, p] = out[r, :, p] * torch.exp(old - new)[..., None] + o_real * torch.exp(l_real - new)[..., None]
    lse[r, :, p] = new


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: RingGroup, scale: float, zigzag: bool, kernel: AttentionKernel,
                local_ids: Optional[list]):
        groups = q.shape[1] // k.shape[1]
        b, s = q.shape[0], q.shape[2]
        kv = torch.stack([k, v]).contiguous()
        # step 0 covers every row (each token sees itself), so lse is finite after it
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        auxes: list[Any] = []  # per-call kernel metadata (CUDA ops want their forward's seq info back)
        plans: list[list] = []  # per ring step its calls, replayed by backward
        for step, (block, plan) in enumerate(_ring_steps(kv, ring, zigzag, s)):
            calls = [] if plan is None else _calls(plan, (ring.rank - step) % ring.size, local_ids, b, q.device)
            plans.append(calls)
            for call in calls:
                if isinstance(call, _Batched):
                    kb, vb = (expand_kv(call.take(t), groups) for t in (block[0], block[1]))
                    o, l, aux = kernel.forward(call.take(q), kb, vb, True, scale)
                    _merge_batched(out, lse, call, o, l)
                else:
                    batch, rows, cols = call
                    kb, vb = _kv_block(block[:, batch], cols, groups)
                    o, l, aux = kernel.forward(q[batch, :, rows].contiguous(), kb, vb, plan[2], scale)
                    _merge(out, lse, rows, o, l, batch)  # copies: kernel outputs may be cached (selective checkpointing)
                auxes.append(aux)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale, ctx.zigzag, ctx.kernel, ctx.auxes = ring, scale, zigzag, kernel, auxes
        ctx.plans = plans
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, zigzag, kernel = ctx.ring, ctx.scale, ctx.zigzag, ctx.kernel
        groups = q.shape[1] // k.shape[1]
        s = q.shape[2]
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # travels with kv and ends at its owner
        auxes = iter(ctx.auxes)
        for (block, plan), calls in zip(_ring_steps(kv, ring, zigzag, s), ctx.plans):
            for call in calls:
                if isinstance(call, _Batched):
                    kb, vb = (expand_kv(call.take(t), groups) for t in (block[0], block[1]))
                    qb, ob, lb, dob = (call.take(t) for t in (q, out, lse, dout))
                    dob = dob * call.valid[:, None, :, None].to(dob.dtype)  # padded query rows contribute nothing
                    dqb, dkb, dvb = kernel.backward(dob, qb, kb, vb, ob, lb, next(auxes), True, scale)
                    r, p = call.index()
                    dq[r, :, p] += call.real(dqb.float())
                    dkv[0][r, :, p] += call.real(reduce_kv(dkb.float(), groups))
                    dkv[1][r, :, p] += call.real(reduce_kv(dvb.float(), groups))
                    continue
                batch, rows, cols = call
                kb, vb = _kv_block(block[:, batch], cols, groups)
                qb, ob, lb, dob = (t[batch, :, rows].contiguous() for t in (q, out, lse, dout))
                dqb, dkb, dvb = kernel.backward(dob, qb, kb, vb, ob, lb, next(auxes), plan[2], scale)
                dq[batch, :, rows] += dqb.float()
                dkv[0][batch, :, cols] += reduce_kv(dkb.float(), groups)
                dkv[1][batch, :, cols] += reduce_kv(dvb.float(), groups)
            # the accumulator follows its block to the next rank; after ring.size hops it is home
            dkv, dkv_works = ring.shift(dkv)
            _wait(dkv_works)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: "dist.ProcessGroup | RingGroup",
    scale: Optional[float] = None,
    zigzag: bool = True,
    backend: str = "auto",
    segments: Optional[Tensor] = None,
) -> Tensor:
    """Exact causal attention of local ``q``/``k``/``v`` (``[b, h, s, d]``, kv heads may be fewer and must
    divide the query heads) whose sequence is split over ``group`` in the contiguous or zigzag layout.

    ``segments``: for packed rows, the ``[b, S]`` sample id of every token of the *whole* sequence (S = s x ring
    size; :func:`lightning_ulysses.parallel.sharding.packed_segments`); attention then stays inside each sample.

    Returns ``[b, h, s, d]`` in ``q``'s layout and dtype. Collective over ``group`` (every rank calls it
    in the same order, forward and backward). Pass a :class:`RingGroup` to skip resolving the neighbours.
    """
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}).")
    if zigzag and q.shape[2] % 2 != 0:
        raise ValueError(f"zigzag ring attention needs an even local length, got {q.shape[2]}.")
    ring = group if isinstance(group, RingGroup) else RingGroup.of(group)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kernel = select_kernel(q.device, q.dtype, backend)
    if segments is not None and segments.shape != (q.shape[0], q.shape[2] * ring.size):
        raise ValueError(f"segments must be [b, S] = {[q.shape[0], q.shape[2] * ring.size]} for the whole sequence, "
                         f"got {list(segments.shape)}.")
    local_ids = local_sample_ids(segments, ring.size, ring.rank, zigzag) if segments is not None else None
    if ring.size == 1 and local_ids is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return _RingAttentionFunction.apply(q, k, v, ring, scale, zigzag, kernel, local_ids)


__all__ = ["RING_BACKENDS", "RingGroup", "ring_attention", "select_kernel"]
