"""Vision-language models under sequence parallelism: the sequence is sharded where it exists, at the decoder's
input, after the vision features are merged into the token embeddings.

Per step:

1. The strategy prepares the *whole* batch (:func:`prepare_multimodal`, before sharding): ``vision_slots [b, S]``
   (the index of each vision placeholder token's feature among the batch's features: images in order, then videos;
   ``-1`` for text) and, for families with 3-D rotary positions (Qwen-VL), ``mm_position_ids [b, S, 3]``
   (temporal, height, width) computed by the model's own ``get_rope_index`` on each packed sample of the whole
   sequence. Both are ``[b, S, ...]``: the strategy shards them with the tokens.
2. Each SP rank runs the model's forward on its shard (:func:`sp_vision_language_forward`, which replaces the inner
   model's ``forward``): the vision tower on this rank's share of the units (:mod:`lightning_ulysses.parallel.vision`),
   the features gathered over the SP group, the shard's token embeddings with its placeholders replaced by their
   features, then the language model on the shard (Ulysses/ring attention applied to it alone, not to the tower).
   Qwen3-VL's DeepStack features travel in the same gather and are added in the first decoder layers at the shard's
   own vision positions (``visual_pos_masks`` of the shard).

Supported families (:data:`SUPPORTED_VLMS`): Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and videos), LLaVA (images).
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_ulysses.compat.deepspeed import zero3_calls
from lightning_ulysses.parallel.vision import Unit, gather_features, split_units, tiles_of, units_of

# batch keys a vision-language model takes besides the text (whole on every rank: not [b, S])
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
# keys prepare_multimodal adds ([b, S, ...]: sharded with the tokens)
PREPARED = ("vision_slots", "mm_position_ids")
_PLAIN_FORWARD = "_lightning_ulysses_plain_forward"
# the tower encodes a rank's units in calls of at most this many patches (whole units): 16 frame groups of a 448 x 448
# video, ~1.05 GiB of one Qwen2.5-VL-7B block's activations
TOWER_TILE_PATCHES = 16384
# a frozen tower's forward keeps no activations (one block's working set at a time), so it takes larger tiles: fewer
# calls, each of which costs ZeRO-3's per-module parameter handling (~32 blocks x 10 modules of hooks) once
FROZEN_TOWER_TILE_PATCHES = 65536
# the attention a segmented tower runs under sdpa (kernels/segments.py); transformers hands packed segments only to
# implementations whose name contains "flash" (compat/transformers.register_varlen_attention)
TOWER_ATTENTION = "lightning_ulysses_segments_flash"
_TOWER_ATTENTION_WAS = "_lightning_ulysses_tower_attention_was"


class VisionLanguageFamily:
    """What the SP path needs to know of a family: where its parts are, how its vision inputs split into units and
    are encoded, and how its positions work. Subclasses: :class:`QwenVL`, :class:`Llava`."""

    name = ""
    model_types: tuple[str, ...] = ()
    rope_3d = False  # positions are (temporal, height, width) per token, from the model's get_rope_index
    # the tower packs windows / frames into one sequence and passes their boundaries (cu_seqlens) to its attention:
    # under sdpa it is switched to TOWER_ATTENTION (one kernel call per segment length, not per segment)
    segmented_tower = False
    # (source, its pixels' batch key, its grid's key or None where the pixels alone say how many items there are)
    sources: tuple[tuple[str, str, Optional[str]], ...] = (("image", "pixel_values", None),)

    def inner(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model holding the tower and the language model (``XForConditionalGeneration.model``)."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).language_model

    def config(self, model: torch.nn.Module) -> Any:
        return model.config

    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """Every vision parameter: the encoder and its projector."""
        raise NotImplementedError

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def token_id(self, model: torch.nn.Module, source: str) -> int:
        cfg = self.config(model)
        return int(getattr(cfg, f"{source}_token_id", None) if getattr(cfg, f"{source}_token_id", None) is not None
                   else getattr(cfg, f"{source}_token_index"))

    def units(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Unit]:
        """The batch's units, images first, in the order their placeholders appear."""
        raise NotImplementedError

    def encode(self, model: torch.nn.Module, units: list[Unit], inputs: dict[str, Any], device: torch.device) -> Tensor:
        """``[sum tokens, H]``: the units' features in order (a one-unit dummy when ``units`` is empty)."""
        raise NotImplementedError

    def split_levels(self, model: torch.nn.Module, features: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The gathered features -> the input embeddings' features and the features added inside the language model
        (none but for DeepStack: :class:`Qwen3VL`)."""
        return features, []

    def rope_grids(self, grid: Optional[Tensor]) -> Optional[Tensor]:
        """``[n, 3]`` grids in the order ``get_rope_index`` consumes them, one per run of placeholders."""
        return grid

    # how a video's placeholders are laid out, said when they do not match its grid (:func:`_check_runs`)
    video_runs_hint = ""


class QwenVL(VisionLanguageFamily):
    """Qwen2-VL / Qwen2.5-VL: ``pixel_values [patches, C*T*P*P]`` with ``image_grid_thw [n, 3]`` (and videos);
    a unit is one temporal group of an image or video (the tower attends within it); 3-D rotary positions."""

    name = "Qwen2-VL / Qwen2.5-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    rope_3d = True
    segmented_tower = True
    sources = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))

    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).visual

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.tower(model).merger

    def merge_size(self, model: torch.nn.Module) -> int:
        return int(self.config(model).vision_config.spatial_merge_size)

    def units(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Unit]:
        merge = self.merge_size(model)
        return [u for source, _, grid in self.sources for u in units_of(inputs.get(grid), source, merge)]

    def encode(self, model: torch.nn.Module, units: list[Unit], inputs: dict[str, Any], device: torch.device) -> Tensor:
        return _merged(self._tower_output(model, units, inputs, device))

    def _tower_output(self, model: torch.nn.Module, units: list[Unit], inputs: dict[str, Any],
                      device: torch.device) -> Any:
        tower = self.tower(model)
        dtype = next(tower.parameters()).dtype
        pixels_of = {source: inputs.get(pixels) for source, pixels, _ in self.sources}
        if units:
            pixels = torch.cat([pixels_of[u.source][u.start : u.start + u.rows] for u in units]).to(dtype)
            grid = torch.tensor([u.grid for u in units], device=device)
        else:  # a dummy frame: merge x merge patches of zeros
            vc, merge = self.config(model).vision_config, self.merge_size(model)
            width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            pixels = torch.zeros(merge * merge, width, dtype=dtype, device=device)
            grid = torch.tensor([(1, merge, merge)], device=device)
        return tower(pixels, grid_thw=grid)


class Qwen3VL(QwenVL):
    """Qwen3-VL: Qwen-VL's units and 3-D positions, plus DeepStack: features of some tower blocks (each through its
    own merger) are added to the first decoder layers' hidden states at the vision positions. ``encode`` returns
    ``[tokens, H * (1 + levels)]`` (the merged features, then each DeepStack level), so one gather carries them all;
    :meth:`split_levels` takes them apart on each rank. A video's frame groups are separated by timestamp text in the
    prompt (the processor's), each group its own run of placeholders."""

    name = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    video_runs_hint = (" Qwen3-VL's processor writes a timestamp before each frame group of a video: each group is a"
                       " run of its own.")

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        tower = self.tower(model)
        return torch.nn.ModuleList([tower.merger, *tower.deepstack_merger_list])

    def levels(self, model: torch.nn.Module) -> int:
        return len(self.config(model).vision_config.deepstack_visual_indexes)

    def encode(self, model: torch.nn.Module, units: list[Unit], inputs: dict[str, Any], device: torch.device) -> Tensor:
        out = self._tower_output(model, units, inputs, device)
        return torch.cat([_merged(out.pooler_output), *[_merged(d) for d in out.deepstack_features]], dim=-1)

    def split_levels(self, model: torch.nn.Module, features: Tensor) -> tuple[Tensor, list[Tensor]]:
        parts = features.chunk(1 + self.levels(model), dim=-1)
        return parts[0], list(parts[1:])

    def rope_grids(self, grid: Optional[Tensor]) -> Optional[Tensor]:
        # timestamps separate a video's frame groups: each group is its own run, with grid (1, h, w)
        if grid is None:
            return None
        split = torch.repeat_interleave(grid, grid[:, 0], dim=0)
        split[:, 0] = 1
        return split


class Llava(VisionLanguageFamily):
    """LLaVA: ``pixel_values [n, C, H, W]``, each image one unit of a fixed token count (the vision encoder's
    patches, its CLS token dropped under the ``"default"`` feature strategy); 1-D positions."""

    name = "LLaVA"
    model_types = ("llava",)

    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = self.inner(model)
        return torch.nn.ModuleList([inner.vision_tower, inner.multi_modal_projector])

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).multi_modal_projector

    def units(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Unit]:
        cfg = self.config(model)
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1  # with the CLS token
        tokens = patches if cfg.vision_feature_select_strategy == "full" else patches - 1
        pixels = inputs.get("pixel_values")
        return [Unit("image", i, 1, (1, 1, 1), tokens, patches) for i in range(0 if pixels is None else pixels.shape[0])]

    def encode(self, model: torch.nn.Module, units: list[Unit], inputs: dict[str, Any], device: torch.device) -> Tensor:
        inner, cfg = self.inner(model), self.config(model)
        dtype = next(inner.vision_tower.parameters()).dtype
        if units:
            pixels = torch.cat([inputs["pixel_values"][u.start : u.start + u.rows] for u in units]).to(dtype)
        else:
            vc = cfg.vision_config
            pixels = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype, device=device)
        out = inner.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return _merged(out)


def _merged(out: Any) -> Tensor:
    """``[tokens, H]`` from a tower's output: a tensor (``[tokens, H]`` or ``[n, t, H]``), a list of per-item
    tensors, or an output whose ``pooler_output`` is one of those (transformers changed this across releases)."""
    pooled = out if torch.is_tensor(out) or isinstance(out, (list, tuple)) else getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0]
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
    return pooled.reshape(-1, pooled.shape[-1])


QWEN_VL, QWEN3_VL, LLAVA = QwenVL(), Qwen3VL(), Llava()
SUPPORTED_VLMS: dict[str, VisionLanguageFamily] = {t: f for f in (QWEN_VL, QWEN3_VL, LLAVA) for t in f.model_types}


def vlm_family(model: Optional[torch.nn.Module]) -> Optional[VisionLanguageFamily]:
    """The family of a vision-language ``model``; ``None`` for a text model. A model with a vision part that is not
    supported is refused, naming the supported ones."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    family = SUPPORTED_VLMS.get(getattr(cfg, "model_type", ""))
    if family is not None:
        return family
    if getattr(cfg, "vision_config", None) is not None:
        names = sorted({f.name for f in SUPPORTED_VLMS.values()})
        raise ValueError(
            f"{type(model).__name__} (model_type={cfg.model_type!r}) is a vision-language model lightning_ulysses does "
            f"not shard yet: its vision features are merged inside the model's forward, after the batch is sharded. "
            f"Supported: {', '.join(names)} (model types {sorted(SUPPORTED_VLMS)}); or train its language model alone."
        )
    return None


# --------------------------------------------------------------------------------------------- the whole batch
def tower_module_ids(model: Optional[torch.nn.Module]) -> set[int]:
    """``id()`` of every module of a supported vision-language model's tower (encoder + projector); empty for any
    other model (no error: the memory tricks use it to keep to the language model's layers)."""
    cfg = getattr(model, "config", None)
    family = SUPPORTED_VLMS.get(getattr(cfg, "model_type", "")) if cfg is not None else None
    return {id(m) for m in family.tower(model).modules()} if family is not None else set()


def prepare_multimodal(full: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Add ``vision_slots`` (and ``mm_position_ids``) to the prepared whole batch ``full`` (``input_ids``,
    ``position_ids [b, S]`` restarting per packed sample, the vision inputs); checks that placeholders and
    features agree."""
    family = vlm_family(model)
    ids, text_pos = full["input_ids"], full["position_ids"]
    slots = torch.full_like(ids, -1)
    done = 0
    units = family.units(model, full)
    for source, pixel_key, grid_key in family.sources:
        token = family.token_id(model, source)
        if grid_key is not None and full.get(pixel_key) is not None and full.get(grid_key) is None:
            raise ValueError(f"The batch has '{pixel_key}' but no '{grid_key}': give the processor's output whole.")
        placeholders = int((ids == token).sum())
        features = sum(u.tokens for u in units if u.source == source)
        if placeholders != features:
            if features and not placeholders:
                why = f"{source}s were given but the text has no {source} token (id {token})"
            elif placeholders and not features:
                why = f"the text has {placeholders} {source} tokens but no {source}s were given"
            else:
                why = f"{placeholders} {source} tokens in the text for {features} {source} features"
            raise ValueError(
                f"Vision inputs do not match the text: {why}. Render samples with the model's own processor (its "
                f"chat template expands each {source} into as many placeholder tokens as the tower gives features); a "
                f"processor of another model uses other token ids or feature counts."
            )
        where = ids == token
        slots[where] = done + torch.arange(placeholders, device=ids.device)  # row-major: the features' order
        done += placeholders
    out = dict(full)
    out["vision_slots"] = slots
    if family.rope_3d:
        out["mm_position_ids"] = _rope_3d_positions(family, model, full, text_pos, family.token_id(model, "image"),
                                                    family.token_id(model, "video"))
    return out


def _rope_3d_positions(family: VisionLanguageFamily, model: torch.nn.Module, full: dict, text_pos: Tensor,
                       image_id: int, video_id: int) -> Tensor:
    """``[b, S, 3]``: the model's ``get_rope_index`` on every packed sample alone (positions restart per sample), the
    grids consumed in order; pure-text samples get their text positions on all three axes."""
    from lightning_ulysses.compat.transformers import rope_index
    from lightning_ulysses.parallel.sharding import packed_segments

    ids = full["input_ids"]
    b, s = ids.shape
    kinds = (ids == image_id).long() + 2 * (ids == video_id).long()  # mm_token_type_ids: 0 text, 1 image, 2 video
    grids = {k: family.rope_grids(_rows(full.get(key))) for k, key in ((1, "image_grid_thw"), (2, "video_grid_thw"))}
    seconds = _rows(full.get("second_per_grid_ts"))
    used = {1: 0, 2: 0}
    segments = packed_segments(text_pos)
    out = text_pos.unsqueeze(-1).expand(b, s, 3).clone()
    inner = family.inner(model)
    for row in range(b):
        seg = segments[row] if segments is not None else torch.zeros(s, dtype=torch.long, device=ids.device)
        for sid in torch.unique_consecutive(seg).tolist():
            where = (seg == sid).nonzero().squeeze(-1)
            lo, hi = int(where[0]), int(where[-1]) + 1
            kind = kinds[row, lo:hi]
            if not bool((kind > 0).any()):
                continue  # text only: the text positions, as the model itself would give
            runs = [(int(k), n) for k, n in _runs(kind.tolist()) if k > 0]
            _check_runs(family, model, grids, used, runs)
            runs = [k for k, _ in runs]
            take = {k: runs.count(k) for k in (1, 2)}
            image_grid = grids[1][used[1] : used[1] + take[1]] if take[1] else None
            video_grid = grids[2][used[2] : used[2] + take[2]] if take[2] else None
            sec = seconds[used[2] : used[2] + take[2]] if take[2] and seconds is not None else None
            used[1], used[2] = used[1] + take[1], used[2] + take[2]
            pos = rope_index(inner, ids[row : row + 1, lo:hi], kind[None], image_grid, video_grid, sec)  # [3, 1, n]
            out[row, lo:hi] = pos[:, 0].T.to(out.dtype)
    return out


def _check_runs(family: VisionLanguageFamily, model: torch.nn.Module, grids: dict, used: dict,
                runs: list[tuple[int, int]]) -> None:
    """Each run of image / video placeholders in a sample is one grid row (``rope_grids``: a Qwen3-VL video gives
    one per frame group), of that row's token count, in order; else the model's ``get_rope_index`` fails deep inside
    (or, for a lucky count, places the tokens wrongly)."""
    merge2 = family.merge_size(model) ** 2
    at = dict(used)
    for k, n in runs:
        rows = grids[k]
        row = rows[at[k]] if rows is not None and at[k] < len(rows) else None
        if row is None or int(row.prod()) // merge2 != n:
            source = "image" if k == 1 else "video"
            why = (f"a run of {n} {source} placeholders where the {source} grids give "
                   + (f"{int(row.prod()) // merge2}" if row is not None else "none left"))
            how = family.video_runs_hint if k == 2 else ""
            raise ValueError(f"Vision placeholders do not match the grids ({family.name}): {why}.{how} Render "
                             f"samples with the model's own processor.")
        at[k] += 1


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dim() > 0 else t.reshape(1)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    import itertools

    return [(k, len(list(g))) for k, g in itertools.groupby(values)]


# --------------------------------------------------------------------------------------------- each rank
def sp_vision_language_forward(
    self: torch.nn.Module,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    vision_slots: Optional[Tensor] = None,
    mm_position_ids: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    **kwargs: Any,
):
    """The inner VLM's forward on this rank's shard (see the module docstring). ``input_ids``, ``position_ids``,
    ``vision_slots [b, s]`` and ``mm_position_ids [b, s, 3]`` are this rank's; the vision inputs (in ``kwargs``) are
    the whole batch's. Without ``vision_slots`` (a call not prepared by the strategy) it is the model's own forward."""
    if vision_slots is None:
        return getattr(self, _PLAIN_FORWARD)(input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    from lightning_ulysses.compat.transformers import multimodal_output
    from lightning_ulysses.parallel.step_context import current_step_context

    family: VisionLanguageFamily = self._lightning_ulysses_family
    inputs = {k: kwargs.pop(k) for k in VISION_INPUTS if k in kwargs}
    for key in ("mm_token_type_ids", "rope_deltas", "mm_encoder_outputs", "vision_feature_layer",
                "vision_feature_select_strategy", "image_sizes"):  # prepared already, or the config's
        kwargs.pop(key, None)
    embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, H]
    ctx = current_step_context()
    features = _sharded_features(family, self, inputs, ctx.sp_group if ctx is not None else None, embeds.device)
    mask = vision_slots >= 0  # [b, s]; features [N, H] (DeepStack: [N, H * (1 + levels)]), N: the vision tokens
    if features.requires_grad and not bool(mask.any()):
        embeds = embeds + 0.0 * features.sum()  # no placeholder here: keep the gather's backward collective
    features, deepstack = family.split_levels(self, features)
    if bool(mask.any()):
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), features[vision_slots[mask]].to(embeds.dtype))
    if deepstack:  # added to the first decoder layers' outputs at this shard's vision positions
        kwargs["visual_pos_masks"] = mask
        kwargs["deepstack_visual_embeds"] = [level[vision_slots[mask]] for level in deepstack]
    if mm_position_ids is not None:  # [4, b, s]: text positions first (packed samples, the attention's causality)
        position_ids = torch.cat([position_ids.unsqueeze(0), mm_position_ids.permute(2, 0, 1)], 0)
    out = self.language_model(input_ids=None, inputs_embeds=embeds, position_ids=position_ids,
                              attention_mask=attention_mask, **kwargs)
    return multimodal_output(self, out)


def _sharded_features(family: VisionLanguageFamily, inner: torch.nn.Module, inputs: dict[str, Any], group: Any,
                      device: torch.device) -> Tensor:
    """The batch's vision features ``[N, H]`` (images, then videos), each rank encoding its contiguous share of the
    units. Every rank runs the tower exactly once (on a dummy unit when it has none): under ZeRO-3 its parameters
    are gathered by collectives every rank must join."""
    import torch.distributed as dist

    units = family.units(inner, inputs)
    sp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    shares = split_units(units, sp)
    lo, hi = shares[rank]
    trains = any(p.requires_grad for p in family.tower(inner).parameters())
    with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
        # whole units per call, at most tower_tile_patches(trains): every block's working set (and its recompute
        # under checkpointing) is one tile's; units are encoded independently, so the features are the same
        tiles = tiles_of(units[lo:hi], tower_tile_patches(trains)) or [[]]
        dummies = _tiles_short_of_the_most(len(tiles), family.tower(inner), device)
        local = torch.cat([family.encode(inner, tile, inputs, device) for tile in tiles]
                          + [family.encode(inner, [], inputs, device)[:0] for _ in range(dummies)])
    if hi == lo:
        local = local[:0]  # the dummy's features are not used; its graph keeps ZeRO-3's backward hooks in step
    counts = [sum(u.tokens for u in units[a:b]) for a, b in shares]
    return gather_features(local, counts, rank, group)


def tower_tile_patches(trains: bool) -> int:
    """The most patches one tower call encodes: :data:`TOWER_TILE_PATCHES` when the tower trains (its blocks keep
    a tile's activations, or recompute them), :data:`FROZEN_TOWER_TILE_PATCHES` when it runs without autograd."""
    return TOWER_TILE_PATCHES if trains else FROZEN_TOWER_TILE_PATCHES


def _tiles_short_of_the_most(tiles: int, tower: torch.nn.Module, device: torch.device) -> int:
    """How many dummy tower calls this rank adds so that every rank calls the tower equally often (under ZeRO-3 each
    call gathers the tower's parameters: :func:`~lightning_ulysses.compat.deepspeed.zero3_calls`)."""
    return zero3_calls(tiles, tower.parameters(), device) - tiles


# --------------------------------------------------------------------------------------------- apply / remove
def apply_multimodal(model: torch.nn.Module) -> Optional[VisionLanguageFamily]:
    """Install the sharded forward on a vision-language ``model``'s inner model (idempotent); ``None`` and nothing
    done for a text model. The language model is what Ulysses attention is applied to (:func:`sp_target`)."""
    family = vlm_family(model)
    if family is None:
        return None
    inner = family.inner(model)
    if not hasattr(inner, _PLAIN_FORWARD):
        setattr(inner, _PLAIN_FORWARD, inner.forward)
        inner.forward = types.MethodType(sp_vision_language_forward, inner)
    inner._lightning_ulysses_family = family
    _use_segment_attention(family, model)
    return family


def _use_segment_attention(family: VisionLanguageFamily, model: torch.nn.Module) -> None:
    """Run a segmented tower's sdpa attention as :func:`~lightning_ulysses.kernels.segments.segment_attention` (the
    same attention in one kernel call per window size instead of one per window); other implementations (eager,
    flash_attention_2) are left as they are."""
    from lightning_ulysses.compat.transformers import (
        attn_implementation, register_varlen_attention, set_attn_implementation,
    )
    from lightning_ulysses.kernels.segments import segment_attention

    inner = family.inner(model)
    config = getattr(family.tower(inner), "config", None)
    if not family.segmented_tower or config is None or hasattr(inner, _TOWER_ATTENTION_WAS):
        return
    if attn_implementation(config) == "sdpa" and register_varlen_attention(TOWER_ATTENTION, segment_attention):
        setattr(inner, _TOWER_ATTENTION_WAS, "sdpa")
        set_attn_implementation(config, TOWER_ATTENTION)


def remove_multimodal(model: torch.nn.Module) -> None:
    """Undo :func:`apply_multimodal`."""
    family = vlm_family(model)
    if family is None:
        return
    inner = family.inner(model)
    if hasattr(inner, _PLAIN_FORWARD):
        del inner.forward
        delattr(inner, _PLAIN_FORWARD)
        del inner._lightning_ulysses_family
    if hasattr(inner, _TOWER_ATTENTION_WAS):
        from lightning_ulysses.compat.transformers import set_attn_implementation

        set_attn_implementation(family.tower(inner).config, getattr(inner, _TOWER_ATTENTION_WAS))
        delattr(inner, _TOWER_ATTENTION_WAS)


def zero3_leaf_tower_blocks(model: torch.nn.Module) -> int:
    """Flag each frozen block of a vision-language ``model``'s tower (the classes its ``_no_split_modules`` names,
    every parameter without ``requires_grad``) as a ZeRO-3 leaf module, and unflag the blocks that train; the number
    flagged (0 for a text model). Call before the DeepSpeed engine is built: its hooks follow the flags.

    ZeRO-3 hooks every sub-module (~11 per Qwen2.5-VL block, ~360 per tower call) and each hook's fetch and release
    runs Python and stream waits between the kernels, so a frozen tower's forward runs host-bound (on one H100 its
    GPU was busy ~1.5 s of a 4.6 s step at 32K tokens). A leaf is hooked once: its parameters are gathered in one
    fetch when it starts and released when it ends. Only frozen blocks: a leaf's gradients take DeepSpeed's delayed
    reduction path, kept out of the trained ones. The flags stay with the ZeRO-3 hooks after fit (the model still
    runs forward under them); the next ZeRO-3 fit sets them again from what is frozen then."""
    family = vlm_family(model)
    if family is None:
        return 0
    from deepspeed.utils import set_z3_leaf_module

    from lightning_ulysses.compat.transformers import block_class_names

    tower = family.tower(model)
    blocks = block_class_names(tower)
    flagged = 0
    for module in tower.modules():
        if type(module).__name__ in blocks and any(True for _ in module.parameters()):
            frozen = not any(p.requires_grad for p in module.parameters())
            set_z3_leaf_module(module, frozen)
            flagged += frozen
    return flagged


def sp_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module sequence-parallel attention applies to: the language model of a VLM (its tower attends within
    images, on whole units), the model itself otherwise."""
    family = vlm_family(model)
    return family.language_model(model) if family is not None else model


def vision_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` a vision-language model takes besides ``input_ids`` / ``position_ids``."""
    return {k: batch[k] for k in (*VISION_INPUTS, *PREPARED) if batch.get(k) is not None}


def checked_vision_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """:func:`vision_inputs`, refusing vision inputs the strategy did not prepare (their 3-D positions and slots
    exist only after :func:`prepare_multimodal`)."""
    inputs = vision_inputs(batch)
    if any(k in inputs for k in VISION_INPUTS) and "vision_slots" not in inputs:
        raise ValueError(
            "This batch has images or videos, but was not prepared by UlyssesDeepSpeedStrategy: train a "
            "vision-language model with strategy='ulysses' (any sequence_parallel_size, 1 and one device included), "
            "which merges the vision features and computes the multimodal positions on the whole sequence."
        )
    return inputs


def freeze_vision(model: torch.nn.Module, tower: bool, projector: bool) -> None:
    """``requires_grad_(False)`` on the vision tower without its projector (``tower``) and/or the projector."""
    family = vlm_family(model)
    if family is None:
        if tower or projector:
            raise ValueError("freeze_vision_tower / freeze_projector need a vision-language model; this one is text only.")
        return
    proj = family.projector(model)
    proj_params = {id(p) for p in proj.parameters()}
    if tower:
        for p in family.tower(model).parameters():
            if id(p) not in proj_params:
                p.requires_grad_(False)
    if projector:
        proj.requires_grad_(False)


__all__ = ["PREPARED", "QWEN3_VL", "QWEN_VL", "SUPPORTED_VLMS", "VISION_INPUTS", "VisionLanguageFamily", "apply_multimodal", "tower_module_ids",
           "checked_vision_inputs", "freeze_vision", "prepare_multimodal", "remove_multimodal", "sp_target", "sp_vision_language_forward",
           "zero3_leaf_tower_blocks",
           "vision_inputs", "vlm_family"]
