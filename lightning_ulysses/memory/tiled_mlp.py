"""Tiled MLP: the MLP of each decoder layer computed in sequence tiles, recomputed tile by tile in backward.

A SwiGLU MLP's intermediates (``gate``, ``up``, ``act(gate) * up`` and their gradients: ~4 x
``intermediate_size`` values per token, 14336 for Llama-3-8B) are the largest per-token activation
left once logits are tiled. Tiling bounds them to one tile: forward runs tile by tile without
keeping anything but the input; backward recomputes one tile at a time with autograd. A forward
without grad (validation, a frozen reference or teacher, predict) runs tile by tile too.

Gradients reach the parameters in one of two ways:

* plain tensors (single device, DDP, ZeRO-0/1/2): each tile's parameter gradients come from
  ``torch.autograd.grad`` and are summed here, then returned once as the function's outputs, so
  every gradient hook (DDP's reducer, ZeRO's buckets) fires exactly once, as for any op;
* ZeRO-3 parameters (partitioned outside their module's forward): each tile runs ``backward`` through
  the module so ZeRO gathers the weights, and ``ds_grad_is_ready`` is False on every tile but the
  last one *actually* produced (DeepSpeed's own TiledMLP counts requested tiles, but ``torch.chunk``
  can return fewer, and then the gradients never reach ZeRO). The tile count is the same on every rank
  (max over the world), because each tile's recompute all-gathers parameters; under the strategy the max comes
  from the step context (one all-reduce per micro-batch, not one per layer and recompute).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.compat.deepspeed import is_zero3_params, set_zero3_grads_ready
from lightning_ulysses.memory.module_swap import any_swapped, inner_forward, restore_with_inner, settings, swap_class
from lightning_ulysses.memory.trick import MemoryTrick
from lightning_ulysses.parallel.step_context import current_step_context


def num_tiles(tokens: int, tile_tokens: int, sync: bool) -> int:
    """Tiles for ``tokens``; with ``sync`` the same count on every rank: from the step's context when the strategy
    recorded the most tokens any rank holds (once per micro-batch), else one all-reduce here (used without the
    strategy)."""
    n = max(1, math.ceil(tokens / tile_tokens))
    if not sync:
        return n
    step = current_step_context()
    most = step.world_max_local_tokens if step is not None else None
    if most is not None and tokens <= most:
        return max(1, math.ceil(most / tile_tokens))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t.item())
    return n


def tiled_forward(mlp: torch.nn.Module, tiles: int, x: Tensor) -> Tensor:
    """``mlp(x)`` for ``x [..., s, h]`` in ``tiles`` token tiles, without autograd: the live intermediates are one
    tile's (``[tokens/tiles, intermediate]``), and each tile's output is written into one preallocated ``[tokens, h]``
    (no list of tile outputs next to their concatenation)."""
    flat = x.reshape(-1, x.shape[-1])  # [tokens, h]: tiles over batch x sequence
    out: Optional[Tensor] = None
    offset = 0
    with torch.no_grad():
        for t in flat.tensor_split(tiles):
            y = mlp._lightning_ulysses_tile_forward(t)
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[offset : offset + y.shape[0]] = y
            offset += y.shape[0]
    assert out is not None
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledMLPFunction(torch.autograd.Function):
    """``y = mlp(x)`` for ``x [..., s, h]`` computed in ``tiles`` pieces along the token dimension."""

    @staticmethod
    def forward(ctx, mlp: torch.nn.Module, tiles: int, x: Tensor, *params: Tensor) -> Tensor:
        ctx.mlp, ctx.tiles = mlp, tiles
        ctx.save_for_backward(x)
        return tiled_forward(mlp, tiles, x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        mlp, tiles = ctx.mlp, ctx.tiles
        all_params = list(mlp.parameters())
        params = [p for p in all_params if p.requires_grad]
        flat = x.detach().reshape(-1, x.shape[-1])
        g_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        x_tiles, g_tiles = flat.tensor_split(tiles), g_flat.tensor_split(tiles)
        zero3 = is_zero3_params(params)
        sums: Optional[list[Tensor]] = None if zero3 else [torch.zeros_like(p, dtype=torch.float32) for p in params]
        offset = 0
        for i, (xt, gt) in enumerate(zip(x_tiles, g_tiles)):
            xt = xt.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                yt = mlp._lightning_ulysses_tile_forward(xt)
            if zero3:
                set_zero3_grads_ready(params, i == len(x_tiles) - 1)
                torch.autograd.backward(yt, gt)  # ZeRO gathers/reduces through the module's hooks
                gx = xt.grad
            else:
                grads = torch.autograd.grad(yt, ([xt] if grad_x is not None else []) + params, gt, allow_unused=True)
                gx, pgrads = (grads[0], grads[1:]) if grad_x is not None else (None, grads)
                for acc, g in zip(sums, pgrads):
                    if g is not None:
                        acc += g.float()
            if grad_x is not None:
                grad_x[offset : offset + xt.shape[0]] = gx
            offset += xt.shape[0]
        if zero3:
            set_zero3_grads_ready(params, True)
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        if zero3:
            return (None, None, grad_x)
        # one gradient per trainable parameter, in the order they were passed in; None for frozen ones
        summed = iter(sums)
        param_grads = [next(summed).to(p.dtype) if p.requires_grad else None for p in all_params]
        return (None, None, grad_x, *param_grads)


KIND = "Tiled"


def _mlp_subclass(cls: type) -> type:
    class Sub(cls):  # type: ignore[misc, valid-type]
        def _lightning_ulysses_tile_forward(self, x: Tensor) -> Tensor:
            return inner_forward(self, x, super().forward)  # the fused SwiGLU when that trick is on

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if args or kwargs or x.dim() < 2:
                return super().forward(x, *args, **kwargs)
            params = list(self.parameters())
            zero3 = is_zero3_params(params)
            tokens = x.numel() // x.shape[-1]
            tiles = num_tiles(tokens, settings(self)["mlp_tile_tokens"] or x.shape[-1], sync=zero3)
            if not torch.is_grad_enabled():
                # nothing to recompute for, but tiling still bounds the forward's intermediates: untiled, a no-grad
                # forward (validation, a frozen reference or teacher, predict) holds gate, up and their product, ~3 x
                # [tokens, intermediate] at once -- with LoRA a few more -- more than a checkpointed training step
                out = tiled_forward(self, tiles, x)
            else:
                # ZeRO-3 parameters are partitioned here (shape [0]) and receive their gradients through the
                # module's own hooks in backward, so they are not inputs of the function
                out = TiledMLPFunction.apply(self, tiles, x) if zero3 else TiledMLPFunction.apply(self, tiles, x, *params)
            if out.shape != x.shape:
                raise ValueError(
                    f"tiled_mlp needs an MLP mapping [..., h] -> [..., h]; {cls.__name__} returned {tuple(out.shape)} "
                    f"for {tuple(x.shape)}. Disable tiled_mlp for this model."
                )
            return out

    return Sub


def is_expert_mlp(mlp: torch.nn.Module) -> bool:
    """An MoE block (router + experts), as transformers' MoE families build them."""
    return hasattr(mlp, "experts") or hasattr(mlp, "gate") and hasattr(mlp, "num_experts") or "moe" in type(mlp).__name__.lower()


def _mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers' ``.mlp`` modules (a vision-language model's tower keeps its own: its merger's ``mlp``
    maps another width, and its blocks run on patches, not on the sequence)."""
    from lightning_ulysses.models.multimodal import tower_module_ids

    tower = tower_module_ids(model)
    found = [m.mlp for m in model.modules()
             if id(m) not in tower and isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    if not found:
        raise ValueError(f"tiled_mlp found no `.mlp` submodule in the layers of {type(model).__name__}.")
    return found


def tiles_mlp(model: torch.nn.Module) -> bool:
    """Whether :func:`enable_tiled_mlp` can tile ``model``: decoder-layer MLPs, none of them mixture-of-experts."""
    try:
        mlps = _mlps(model)
    except ValueError:  # no decoder-layer MLP
        return False
    return not any(is_expert_mlp(m) for m in mlps)


def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: Optional[int] = None) -> int:
    """Tile every decoder layer's ``.mlp`` (instance class swap; idempotent). Returns how many.

    ``tile_tokens`` defaults to the hidden size (the tile's intermediates then cost about as much as
    ``intermediate_size / hidden_size`` layer inputs).
    """
    mlps = _mlps(model)
    experts = [type(m).__name__ for m in mlps if is_expert_mlp(m)]
    if experts:
        raise ValueError(
            f"tiled_mlp does not support mixture-of-experts blocks ({experts[0]}): their forward routes each token to "
            "its experts and returns router logits next to the hidden states. Turn tiled_mlp off for this model "
            "(tiled_loss, offload and the other tricks still apply)."
        )
    for mlp in mlps:
        swap_class(mlp, KIND, _mlp_subclass)
        settings(mlp)["mlp_tile_tokens"] = tile_tokens
    return len(mlps)


def disable_tiled_mlp(model: torch.nn.Module) -> None:
    for m in model.modules():
        restore_with_inner(m, KIND)  # an untiled MLP keeps a fused SwiGLU if that trick is on


def tiled_mlp_enabled(model: torch.nn.Module) -> bool:
    return any_swapped(model, KIND)


class TiledMLP(MemoryTrick):
    """Each decoder layer's MLP computed in token tiles, recomputed tile by tile in backward (module docstring).

    Args:
        tile_tokens: tokens per tile; default: the model's hidden size.
    """

    order = 30
    flag = "tiled_mlp"
    flag_options = {"tiled_mlp_tile_tokens": "tile_tokens"}

    def __init__(self, tile_tokens: Optional[int] = None) -> None:
        if tile_tokens is not None and tile_tokens < 1:
            raise ValueError(f"tiled MLP tile_tokens must be a positive int or None, got {tile_tokens}.")
        self.tile_tokens = tile_tokens

    def apply(self, model: torch.nn.Module) -> None:
        enable_tiled_mlp(model, self.tile_tokens)

    def remove(self, model: torch.nn.Module) -> None:
        disable_tiled_mlp(model)


__all__ = ["TiledMLP", "TiledMLPFunction", "disable_tiled_mlp", "enable_tiled_mlp", "num_tiles", "tiled_forward",
           "tiled_mlp_enabled", "tiles_mlp"]
