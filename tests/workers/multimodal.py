"""Vision-language training under SP, several cases in one launched job.

``multimodal.py CASES_JSON OUT_DIR``: each case fits a :class:`CausalLMModule` on a tiny Qwen2-VL (built from a
config dict, random init) with fixed batches of images / videos (:func:`batches`) and plain SGD, and writes from
rank 0 ``OUT_DIR/<name>.json``: the batches of every DP group, the losses, the initial and final weights (gathered).
``tests/test_multimodal.py`` replays them through plain single-process transformers and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.checkpoint.weights import gather_weights  # noqa: E402
from lightning_ulysses.lightning.callbacks import SequenceThroughput  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

IMG, VID, VS, VE = 120, 121, 122, 123
QWEN2_VL = {
    "model_type": "qwen2_vl", "image_token_id": IMG, "video_token_id": VID, "vision_start_token_id": VS,
    "vision_end_token_id": VE,
    "text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                    "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "bos_token_id": 1,
                    "eos_token_id": 2},
    "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
                      "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3},
}
LLAVA = {
    "model_type": "llava", "image_token_id": IMG,
    "text_config": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
}
LLAVA_TOKENS = 4  # (8 / 4)^2 patches per image, CLS dropped ("default" feature strategy)
QWEN2_5_VL = dict(QWEN2_VL, model_type="qwen2_5_vl", vision_config={
    "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32, "patch_size": 2,
    "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "window_size": 8, "fullatt_block_indexes": [1]})
# Qwen3-VL: DeepStack (blocks 0 and 1 feed the first two decoder layers), interleaved 3-D rotary positions
QWEN3_VL = dict(QWEN2_VL, model_type="qwen3_vl", text_config={
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                        "mrope_interleaved": True}},
    vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                   "patch_size": 2, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                   "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]})
MODELS = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_5_VL, "qwen3_vl": QWEN3_VL, "llava": LLAVA}
TIMESTAMP = 50  # a text token before each frame group of a Qwen3-VL video (its processor writes "<t seconds>")
PATCH = 3 * 2 * 2 * 2  # in_channels x temporal_patch_size x patch_size^2
LR = 0.5


def _sample(g: torch.Generator, parts: list) -> tuple[list[int], list, list]:
    """``parts``: ints (text tokens), ("image" | "video", t, h, w) (Qwen-VL) or ("llava",) (one LLaVA image)
    -> ids, image grids, video grids."""
    ids, grids = [], {"image": [], "video": []}
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(3, 100, (part,), generator=g).tolist()
        elif part[0] == "llava":
            ids += [IMG] * LLAVA_TOKENS
            grids["image"].append(None)
        elif part[0] == "video_ts":  # Qwen3-VL: each frame group after its timestamp, in its own start/end tokens
            _, t, h, w = part
            for _ in range(t):
                ids += [TIMESTAMP, VS] + [VID] * (h * w // 4) + [VE]
            grids["video"].append([t, h, w])
        else:
            kind, t, h, w = part
            ids += [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
            grids[kind].append([t, h, w])
    return ids, grids["image"], grids["video"]


KINDS = {
    # an image, a video and a second image: placeholders straddle the shard boundary
    "mixed": [5, ("image", 1, 4, 4), 7, ("video", 3, 4, 4), 3, ("image", 1, 4, 8), 6],
    # images only; the second half of the row is one image's tokens: rank 1 of sp=2 holds no label
    "image_tail": [7, ("image", 1, 8, 20), -1],
    "images": [4, ("image", 1, 4, 4), 9, ("image", 1, 8, 4), 5],
    "mixed_ts": [5, ("image", 1, 4, 4), 7, ("video_ts", 3, 4, 4), 3, ("image", 1, 4, 8), 6],  # Qwen3-VL's video
    "llava": [5, ("llava",), 7, ("llava",), ("llava",), 6],  # two images side by side
    "llava_one": [3, ("llava",), 9],
}


def batch(kind: str, seed: int, packed: bool = False) -> dict:
    """One row (or, ``packed``, two samples in one row, positions restarting) with its pixels."""
    g = torch.Generator().manual_seed(seed)
    samples = [KINDS[kind]] + ([KINDS["images"]] if packed else [])
    ids, pos, image_grid, video_grid = [], [], [], []
    for parts in samples:
        tail = parts[-1] == -1
        s_ids, s_img, s_vid = _sample(g, parts[:-1] if tail else parts)
        if tail:
            s_ids = s_ids[:-1]  # end inside the image: no closing token
        ids += s_ids
        pos += list(range(len(s_ids)))
        image_grid += s_img
        video_grid += s_vid
    rows = lambda grid: sum(t * h * w for t, h, w in grid)  # noqa: E731
    ids_t, pos_t = torch.tensor([ids]), torch.tensor([pos])
    # nothing predicts a sample's first token (as the data modules' packed rows): no label across samples
    labels = ids_t.masked_fill((ids_t == IMG) | (ids_t == VID) | (pos_t == 0), -100)
    out = {"input_ids": ids_t, "labels": labels, "position_ids": pos_t}
    if image_grid and image_grid[0] is None:  # LLaVA: whole images
        out["pixel_values"] = torch.randn(len(image_grid), 3, 8, 8, generator=g)
    elif image_grid:
        out["pixel_values"] = torch.randn(rows(image_grid), PATCH, generator=g)
        out["image_grid_thw"] = torch.tensor(image_grid)
    if video_grid:
        out["pixel_values_videos"] = torch.randn(rows(video_grid), PATCH, generator=g)
        out["video_grid_thw"] = torch.tensor(video_grid)
    return out


class Batches(torch.utils.data.Dataset):
    def __init__(self, case: dict) -> None:
        self.items = [batch(kind, seed, case.get("packed", False)) for seed, kind in enumerate(case["kinds"])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class Record(L.Callback):
    def __init__(self) -> None:
        self.batches, self.losses, self.initial = [], [], None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = gather_weights(pl_module.model)

    def on_train_start(self, trainer, pl_module) -> None:  # the engine is built: ZeRO-3 hooks the leaves whole
        self.leaves = sum(bool(getattr(m, "_z3_leaf", False)) for m in pl_module.model.modules())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class Recorded(CausalLMModule):
    recorder: Record

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.recorder.batches.append({k: v.tolist() for k, v in batch.items()})
        return batch


def run(case: dict, out: Path) -> None:
    import lightning_ulysses.models.multimodal as mm

    # small tiles: a rank's units go through the tower in several calls (ranks differ in how many: dummy calls)
    mm.TOWER_TILE_PATCHES = case.get("tile_patches", 16384)
    mm.FROZEN_TOWER_TILE_PATCHES = case.get("tile_patches", 65536)
    rec = Record()
    module = Recorded(MODELS[case.get("model", "qwen2_vl")], attn_implementation="sdpa", optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                      freeze_vision_tower=case.get("freeze_tower", False))
    module.recorder = rec
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=case["sp"], stage=case["stage"],
                                        context_parallel_mode=case.get("mode", "auto"),
                                        gradient_checkpointing=case.get("checkpointing"))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=case.get("devices", 2), max_steps=len(case["kinds"]),
                        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec, throughput := SequenceThroughput()])
    # a list per item: the collate adds the batch dimension the items already have
    loader = DataLoader(Batches(case), batch_size=None)
    trainer.fit(module, loader)
    weights = gather_weights(module.model)
    everyone = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, rec.batches)
    if trainer.global_rank == 0:
        last = throughput.history[-1]
        inner = module.model.model
        result = {"losses": rec.losses, "layout": trainer.strategy.layout.describe(), "leaves": rec.leaves,
                  # what the user holds after fit: the model's own forward, no sequence-parallel attention left
                  "unpatched": "forward" not in vars(inner) and not any(
                      k.startswith("_lightning_ulysses") for m in module.model.modules() for k in vars(m)),
                  "vision_patches_per_step": last["throughput/vision_patches_per_sec"] * last["throughput/step_s"],
                  "tokens_per_step": last["throughput/tokens_per_sec"] * last["throughput/step_s"],
                  "dp_batches": everyone[:: trainer.strategy.layout.sp],
                  "initial": {k: v.tolist() for k, v in rec.initial.items()},
                  "weights": {k: v.tolist() for k, v in weights.items()}}
        (out / f"{case['name']}.json").write_text(json.dumps(result))


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    for case in cases:
        run(case, out)
    exit_distributed()


if __name__ == "__main__":
    main()
