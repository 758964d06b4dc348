"""Vision-language models under SP (:mod:`lightning_ulysses.models.multimodal`): a tiny Qwen2-VL trained by the
strategy matches plain single-process transformers (loss every step, final weights of every parameter, the vision
tower's included), plain SGD; the vision tower's share per rank; bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.harness import WORKERS, worker_env

sys.path.insert(0, str(WORKERS))
from multimodal import IMG, LR, MODELS, PATCH, QWEN2_VL, VID, batch  # noqa: E402

CASES = [
    # images and a video; a row whose second half is one image's tokens (that rank holds no label)
    {"name": "qwen2_vl_sp2_zero2", "sp": 2, "stage": 2, "kinds": ["mixed", "image_tail", "images"]},
    # the tower in tiles of 16 patches (one frame group each; the ranks call it a different number of times)
    {"name": "qwen2_vl_video_sp2_zero3_checkpointing", "sp": 2, "stage": 3, "kinds": ["mixed", "mixed"],
     "checkpointing": True, "tile_patches": 16},
    # ZeRO-3 fetches each frozen tower block whole (a leaf module)
    {"name": "qwen2_vl_frozen_tower_sp2_zero3", "sp": 2, "stage": 3, "kinds": ["mixed", "images"], "freeze_tower": True,
     "tile_patches": 16},
    # two samples per row, positions restarting: 3-D positions per sample
    {"name": "qwen2_vl_packed_sp2_zero1", "sp": 2, "stage": 1, "kinds": ["mixed", "image_tail"], "packed": True},
    # Qwen2.5-VL: windowed vision attention, video timing in the 3-D positions
    {"name": "qwen2_5_vl_sp2_zero2", "sp": 2, "stage": 2, "model": "qwen2_5_vl", "kinds": ["mixed", "images"]},
    # Qwen3-VL: DeepStack features of two tower blocks added in the first two decoder layers; timestamped video
    {"name": "qwen3_vl_sp2_zero3", "sp": 2, "stage": 3, "model": "qwen3_vl", "kinds": ["mixed_ts", "images"]},
    # the second family: LLaVA (a CLIP tower + projector, 1-D positions)
    {"name": "llava_sp2_zero2", "sp": 2, "stage": 2, "model": "llava", "kinds": ["llava", "llava_one", "llava"]},
]
CASES_4 = [  # a second launched job, 4 ranks: sp=2 x dp=2 at ZeRO-3 with videos; ring attention alone
    {"name": "qwen2_vl_video_sp2_dp2_zero3", "sp": 2, "stage": 3, "devices": 4,
     "kinds": ["mixed", "images", "mixed", "image_tail"], "tile_patches": 16},
    {"name": "qwen2_vl_ring4_zero2", "sp": 4, "stage": 2, "devices": 4, "mode": "ring_only",
     "kinds": ["mixed", "image_tail", "mixed", "images"]},
]


def _launch(tmp_path_factory, cases: list, ranks: int) -> dict:
    out = tmp_path_factory.mktemp("multimodal")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(WORKERS / "multimodal.py"), json.dumps(cases), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return {c["name"]: json.loads((out / f"{c['name']}.json").read_text()) for c in cases}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, CASES, 2)


@pytest.fixture(scope="module")
def job4(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, CASES_4, 4)


def _model(name: str = "qwen2_vl"):
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = dict(MODELS[name])
    return AutoModelForImageTextToText.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                                   attn_implementation="sdpa")


def _fit_one_process(module, loader=None, *, datamodule=None, max_steps: int = -1) -> list[float]:
    """``module`` fitted in this process (devices=1, sp=1, ZeRO-2; one epoch or ``max_steps``): the step losses."""
    import lightning as L

    from lightning_ulysses import UlyssesDeepSpeedStrategy

    losses: list[float] = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=2), accelerator="cpu",
                        devices=1, max_epochs=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[Keep()])
    trainer.fit(module, loader, datamodule=datamodule)
    return losses


def _loss_sum(model, b: dict) -> tuple[torch.Tensor, int]:
    """transformers' own forward on one sample (its own 3-D positions), summed CE and label count."""
    ids = b["input_ids"]
    extra = {k: b[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in b}
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        extra["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    out = model(input_ids=ids, **extra)
    logits = out.logits[0, :-1].float()
    labels = b["labels"][0, 1:]
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return ce, int((labels != -100).sum())


def _split_packed(b: dict) -> list[dict]:
    """A packed row -> its samples, each with its own pixels (images / videos consumed in order)."""
    pos = b["position_ids"][0]
    starts = (pos == 0).nonzero().squeeze(-1).tolist() + [pos.numel()]
    used = {"image": [0, 0], "video": [0, 0]}  # grids, rows
    out = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        ids = b["input_ids"][:, lo:hi]
        sample = {"input_ids": ids, "labels": b["labels"][:, lo:hi]}
        for kind, token in (("image", IMG), ("video", VID)):
            grid_key, pix_key = f"{kind}_grid_thw", "pixel_values" if kind == "image" else "pixel_values_videos"
            n = int((ids == token).sum())
            if not n:
                continue
            grids, count = [], 0
            while count < n:
                g = b[grid_key][used[kind][0]]
                grids.append(g)
                count += int(g.prod()) // 4
                used[kind][0] += 1
            rows = sum(int(g.prod()) for g in grids)
            sample[grid_key] = torch.stack(grids)
            sample[pix_key] = b[pix_key][used[kind][1] : used[kind][1] + rows]
            used[kind][1] += rows
        out.append(sample)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_vision_language_training_matches_single_process(job, case) -> None:
    assert "sp 2 x dp 1" in job[case["name"]]["layout"]
    _check_against_single_process(job[case["name"]], case)


@pytest.mark.parametrize("case", CASES_4, ids=lambda c: c["name"])
def test_vision_language_training_on_4_ranks_matches_single_process(job4, case) -> None:
    assert ("ring 4" if case.get("mode") == "ring_only" else "sp 2 x dp 2") in job4[case["name"]]["layout"]
    _check_against_single_process(job4[case["name"]], case)


def _check_against_single_process(result: dict, case: dict) -> None:
    model = _model(case.get("model", "qwen2_vl")).train()
    model.load_state_dict({k: torch.tensor(v) for k, v in result["initial"].items()})
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tower = [n for n, p in model.named_parameters()
             if (".visual." in n and ".merger." not in n) or ".vision_tower." in n]
    if case.get("freeze_tower"):
        for n, p in model.named_parameters():
            p.requires_grad_(n not in tower)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(len(result["losses"])):
        losses = []
        for batches in result["dp_batches"]:
            b = {k: torch.tensor(v) for k, v in batches[step].items()}
            sums = [_loss_sum(model, s) for s in (_split_packed(b) if case.get("packed") else [b])]
            losses.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
        assert result["losses"][step] == pytest.approx(float(losses[0]), rel=1e-4, abs=1e-5), step
        opt.zero_grad()
        torch.stack(losses).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(torch.tensor(result["weights"][name]), p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert result["unpatched"]  # the model handed back after fit runs transformers' own forward
    # under ZeRO-3 a frozen tower's blocks are ZeRO-3 leaf modules (one parameter fetch each); trained blocks are not
    blocks = _model(case.get("model", "qwen2_vl")).config.vision_config.depth if case.get("model") != "llava" else 0
    assert result["leaves"] == (blocks if case.get("freeze_tower") and case["stage"] == 3 else 0)
    # SequenceThroughput counts the tower's patches apart from the language model's tokens (the last step's batches)
    last = [b[-1] for b in result["dp_batches"]]
    patches = sum(len(b.get("pixel_values", [])) + len(b.get("pixel_values_videos", [])) for b in last)
    if case.get("model") == "llava":
        patches = sum(len(b["pixel_values"]) for b in last) * 5  # 4 patches + CLS per image
    assert result["vision_patches_per_step"] == pytest.approx(patches)
    moved = [n for n in tower if not torch.equal(torch.tensor(result["weights"][n]), initial[n])]
    assert (moved == []) is bool(case.get("freeze_tower")), moved  # the tower trains unless frozen


def test_units_are_dealt_to_ranks_in_order_and_balanced() -> None:
    from lightning_ulysses.parallel.vision import Unit, split_units, tiles_of, units_of

    units = units_of(torch.tensor([[1, 4, 4], [1, 8, 8]]), "image", 2) + units_of(torch.tensor([[3, 4, 4]]), "video", 2)
    assert [(u.source, u.start, u.rows, u.tokens) for u in units] == [
        ("image", 0, 16, 4), ("image", 16, 64, 16), ("video", 0, 16, 4), ("video", 16, 16, 4), ("video", 32, 16, 4)]
    for sp in (1, 2, 3, 4, 8):
        parts = split_units(units, sp)
        assert parts[0][0] == 0 and parts[-1][1] == len(units) and len(parts) == sp
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, in order
    assert split_units(units[2:], 3) == [(0, 1), (1, 2), (2, 3)]  # a video's frames spread over the ranks
    assert split_units(units[:1], 2) == [(0, 1), (1, 1)]  # fewer units than ranks: one rank encodes none
    # a rank's share goes through the tower in tiles of whole units, at most N patches each (a larger unit alone)
    sizes = lambda tiles: [[u.rows for u in tile] for tile in tiles]  # noqa: E731
    assert sizes(tiles_of(units, 32)) == [[16], [64], [16, 16], [16]]
    assert sizes(tiles_of(units, 1 << 20)) == [[16, 64, 16, 16, 16]] and tiles_of([], 32) == []
    # LLaVA: one pixel row per image, 577 patches each: tiles count patches, not rows
    images = [Unit("image", i, 1, (1, 1, 1), 576, 577) for i in range(5)]
    assert [len(t) for t in tiles_of(images, 1200)] == [2, 2, 1]
    # a frozen tower keeps no activations: larger tiles, fewer calls (each costs ZeRO-3's parameter handling once)
    from lightning_ulysses.models.multimodal import (
        FROZEN_TOWER_TILE_PATCHES, TOWER_TILE_PATCHES, tower_tile_patches,
    )

    assert tower_tile_patches(True) == TOWER_TILE_PATCHES < tower_tile_patches(False) == FROZEN_TOWER_TILE_PATCHES


def test_bad_vision_inputs_are_clear_errors() -> None:
    from lightning_ulysses.models.multimodal import prepare_multimodal, vlm_family
    from lightning_ulysses.parallel.sharding import prepare_batch

    model = _model()
    good = batch("mixed", 0)
    prepare_multimodal(prepare_batch(good, 1), model)
    no_token = dict(good, input_ids=good["input_ids"].masked_fill(good["input_ids"] == IMG, 5))
    with pytest.raises(ValueError, match="images were given but the text has no image token"):
        prepare_multimodal(prepare_batch(no_token, 1), model)
    extra = dict(good, image_grid_thw=good["image_grid_thw"][:1], pixel_values=good["pixel_values"][:16])
    with pytest.raises(ValueError, match="12 image tokens in the text for 4 image features.*model's own processor"):
        prepare_multimodal(prepare_batch(extra, 1), model)
    text_only = {k: good[k] for k in ("input_ids", "labels")}
    with pytest.raises(ValueError, match="the text has 12 image tokens but no images were given"):
        prepare_multimodal(prepare_batch(text_only, 1), model)
    from types import SimpleNamespace

    gemma3 = SimpleNamespace(config=SimpleNamespace(model_type="gemma3", vision_config={}))
    with pytest.raises(ValueError, match="not shard yet.*Supported: LLaVA, Qwen2-VL / Qwen2.5-VL"):
        vlm_family(gemma3)
    llava = _model("llava")
    text = batch("llava", 0)
    with pytest.raises(ValueError, match="12 image tokens in the text for 8 image features"):
        prepare_multimodal(prepare_batch(dict(text, pixel_values=text["pixel_values"][:2]), 1), llava)
    # Qwen3-VL: a video's frame groups each after its timestamp; one unbroken run of a video's placeholders is refused
    qwen3 = _model("qwen3_vl")
    prepare_multimodal(prepare_batch(batch("mixed_ts", 0), 1), qwen3)
    with pytest.raises(ValueError, match="a run of 12 video placeholders where the video grids give 4.*timestamp"):
        prepare_multimodal(prepare_batch(good, 1), qwen3)


def test_a_vision_batch_without_the_strategy_is_refused() -> None:
    from lightning_ulysses import CausalLMModule

    module = CausalLMModule(QWEN2_VL, attn_implementation="sdpa")
    module.configure_model()
    with pytest.raises(ValueError, match="not prepared by UlyssesDeepSpeedStrategy"):
        module.compute_loss(batch("mixed", 0))


ROOT = WORKERS.parents[1]
PROCESSOR = str(ROOT / "data" / "vlm" / "processor")


def test_multimodal_data_module_renders_expands_and_packs(tmp_path) -> None:
    """The shipped sample through the processor: each image placeholder expanded to the image processor's grid
    (t*h*w/merge^2 tokens, never labelled), labels on the assistant turns only, whole samples packed with positions
    restarting, pixels in placeholder order; bad samples are clear errors."""
    from lightning_ulysses.data import MultimodalSFTDataModule

    dm = MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "conversations.jsonl"), PROCESSOR, seq_len=128)
    dm.setup("fit")
    tok = dm.renderer.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert dm.stats["train"].samples == 24 and dm.stats["train"].dropped == 0
    for row in dm._rows["train"]:
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == 128
        grid = row["image_grid_thw"]
        assert sum(1 for t in ids if t == image_id) == int((grid.prod(-1) // 4).sum())
        assert row["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        assert all(label == -100 for t, label in zip(ids, labels) if t == image_id)
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(ids)]):  # each sample: only its answer is labelled
            text = tok.decode([t for t, label in zip(ids[a:b], labels[a:b]) if label != -100])
            assert text.startswith(("It is", "a ")) and text.endswith("<|end|>"), text
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].dtype == torch.float32 and batch["image_grid_thw"].shape[1] == 3

    bad = tmp_path / "bad.jsonl"
    sample = json.loads((ROOT / "data" / "vlm" / "conversations.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(dict(sample, images=[])) + "\n")
    with pytest.raises(ValueError, match="more {'type': 'image'} items than files"):
        MultimodalSFTDataModule(str(bad), PROCESSOR, media_root=str(ROOT / "data" / "vlm")).setup("fit")
    bad.write_text(json.dumps(dict(sample, images=sample["images"] * 2)) + "\n")
    with pytest.raises(ValueError, match="have no {'type': 'image'} item"):
        MultimodalSFTDataModule(str(bad), PROCESSOR, media_root=str(ROOT / "data" / "vlm")).setup("fit")
    with pytest.raises(ValueError, match="more than seq_len=16.*never cut"):
        MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "conversations.jsonl"), PROCESSOR, seq_len=16).setup("fit")
    with pytest.raises(ValueError, match="a sample with images is never cut"):
        MultimodalSFTDataModule("x.jsonl", PROCESSOR, too_long="split")
    with pytest.raises(ValueError, match="has no image processor"):
        MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "conversations.jsonl"), str(ROOT / "data" / "tokenizer")).setup("fit")


def test_multimodal_videos_need_the_video_processor() -> None:
    """Videos go through transformers' video processor (it needs torchvision): with it, the video's frame groups are
    expanded like images; without it, the error names the fix."""
    import importlib.util

    from lightning_ulysses.data import MultimodalSFTDataModule

    dm = MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "videos.jsonl"), PROCESSOR, seq_len=512)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ValueError, match="needs torchvision"):
            dm.setup("fit")
        return
    dm.setup("fit")
    row = dm._rows["train"][0]
    assert int((row["video_grid_thw"].prod(-1) // 4).sum()) == sum(
        1 for t in row["input_ids"] if t == dm.renderer.tokenizer.convert_tokens_to_ids("<|video_pad|>"))


@pytest.mark.parametrize("way, name", [("directory", "qwen2_vl"), ("instance", "qwen2_vl"), ("directory", "qwen3_vl"),
                                       ("instance", "qwen3_vl")])
def test_one_process_fit_from_a_saved_directory_or_an_instance(way, name, tmp_path) -> None:
    """The ways in a user has besides a config dict: a saved checkpoint directory (``save_pretrained``) or the model
    instance itself; one process, devices=1 (sp=1): the loss equals transformers' own, and the user's model is handed
    back unpatched."""
    from torch.utils.data import DataLoader

    from lightning_ulysses import CausalLMModule

    saved = _model(name)
    saved.save_pretrained(tmp_path / "vlm")
    b = batch("mixed_ts" if name == "qwen3_vl" else "mixed", 0)
    expected = _loss_sum(saved, b)
    spec = str(tmp_path / "vlm") if way == "directory" else saved
    module = CausalLMModule(spec, attn_implementation="sdpa", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    losses = _fit_one_process(module, DataLoader([b], batch_size=None), max_steps=1)
    assert losses[0] == pytest.approx(float(expected[0] / expected[1]), rel=1e-4)
    model = module.model
    assert type(model).__name__ == type(saved).__name__ and (model is saved) is (way == "instance")
    assert "forward" not in vars(model.model)  # its own forward again
    out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                mm_token_type_ids=(b["input_ids"] == IMG).int() + 2 * (b["input_ids"] == VID).int())
    assert out.logits.shape[1] == b["input_ids"].shape[1]


def test_save_attention_counts_decoder_layers_and_the_tower_recomputes_fully() -> None:
    """``save_attention_layers=N`` means the first N *decoder* layers (a tower's blocks come first in module order),
    and the tower's blocks take the full policy (their windowed attention is cheap to recompute)."""
    from lightning_ulysses.compat.transformers import checkpointed_layers
    from lightning_ulysses.memory.activation_checkpoint import (
        decoder_layers, enable_gradient_checkpointing, saved_attention_fraction,
    )

    model = _model("qwen2_5_vl")
    decoder = decoder_layers(model)
    tower = [m for m in checkpointed_layers(model) if all(m is not d for d in decoder)]
    assert len(decoder) == 2 and len(tower) == 2  # the text config's layers; the vision config's depth
    keeps = lambda layer: "context_fn" in layer._gradient_checkpointing_func.keywords  # noqa: E731
    enable_gradient_checkpointing(model, "save_attention")
    assert all(keeps(d) for d in decoder) and not any(keeps(b) for b in tower)
    enable_gradient_checkpointing(model, "save_attention", save_attention_layers=1)
    assert [keeps(d) for d in decoder] == [True, False] and not any(keeps(b) for b in tower)
    assert saved_attention_fraction(model) == 0.5


def test_lora_on_a_vision_language_model(tmp_path) -> None:
    """LoRA adapters on the language model's attention (PEFT), one process: the first loss is transformers' own (the
    adapters start as the identity), only adapter weights train, the tower and the base weights stay as they were,
    and the user gets the PEFT model back unpatched."""
    pytest.importorskip("peft")
    from torch.utils.data import DataLoader

    from lightning_ulysses import CausalLMModule

    saved = _model()
    saved.save_pretrained(tmp_path / "vlm")
    b = batch("mixed", 0)
    expected = _loss_sum(saved, b)
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = CausalLMModule(str(tmp_path / "vlm"), attn_implementation="sdpa", peft=lora,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    losses = _fit_one_process(module, DataLoader([b, b], batch_size=None), max_steps=2)
    assert losses[0] == pytest.approx(float(expected[0] / expected[1]), rel=1e-4) and losses[1] != losses[0]
    model = module.model
    assert type(model).__name__ == "PeftModelForCausalLM" or "Peft" in type(model).__name__
    before = dict(saved.named_parameters())
    moved = {n for n, p in model.named_parameters() if "lora_" not in n
             and not torch.equal(p, before[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert moved == set() and any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any(k.startswith("_lightning_ulysses") for m in model.modules() for k in vars(m))


def _llava_processor(path) -> str:
    """A LLaVA processor over the shipped tokenizer: ``<image>`` added, a CLIP image processor at 8 x 8 pixels (4
    patches of 4, the CLS token dropped: 4 tokens per image), the shipped chat template with ``<image>`` as the image
    item. Saved to ``path``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from lightning_ulysses.data.tokenizer import load_tokenizer

    tok = load_tokenizer(PROCESSOR)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (ROOT / "data" / "vlm" / "processor" / "chat_template.jinja").read_text()
    template = template.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
                          tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    proc.save_pretrained(path)
    return str(path)


def test_multimodal_data_module_renders_a_llava_processor_and_trains_llava(tmp_path) -> None:
    """The second family through the data module: a LLaVA processor (saved directory) expands each ``<image>`` to its
    4 feature tokens (never labelled) with ``pixel_values [n, 3, 8, 8]``; one process trains a LLaVA model on those
    rows with transformers' own loss on each row (plain SGD at lr 0: the losses are the rows' losses); a video in a
    LLaVA sample is a clear error."""
    import warnings

    from transformers import AutoConfig, AutoModelForImageTextToText

    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.data import MultimodalSFTDataModule

    processor = _llava_processor(tmp_path / "llava")
    dm = MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "conversations.jsonl"), processor, seq_len=512,
                                 packing="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CLIP's image processor falls back to PIL without torchvision
        dm.setup("fit")
    image = dm.renderer.placeholders["image"][1]
    rows = dm._rows["train"]
    for row in rows:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        assert int((ids == image).sum()) == 4 * row["pixel_values"].shape[0]
        assert row["pixel_values"].shape[1:] == (3, 8, 8) and bool((labels[ids == image] == -100).all())
    spec = dict(MODELS["llava"], image_token_id=image,
                text_config=dict(MODELS["llava"]["text_config"], vocab_size=len(dm.renderer.tokenizer)))
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                                    attn_implementation="sdpa")
    expected = []
    with torch.no_grad():
        for row in rows:
            out = model(input_ids=torch.tensor([row["input_ids"]]), pixel_values=row["pixel_values"],
                        labels=torch.tensor([row["labels"]]))
            expected.append(float(out.loss))
    module = CausalLMModule(model, attn_implementation="sdpa", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    losses = _fit_one_process(module, datamodule=dm)
    assert sorted(losses) == pytest.approx(sorted(expected), rel=1e-4)
    with pytest.raises(ValueError, match="does not render"):
        MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "videos.jsonl"), processor, seq_len=512).setup("fit")


def test_multimodal_data_module_rows_train_qwen3_vl(tmp_path) -> None:
    """Qwen3-VL images through the data module: the Qwen-VL processor's rows (each ``<|image_pad|>`` expanded to the
    grid's merged count) train a Qwen3-VL model (DeepStack on) in one process with transformers' own loss on each row
    (plain SGD at lr 0: the losses are the rows' losses)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.data import MultimodalSFTDataModule

    dm = MultimodalSFTDataModule(str(ROOT / "data" / "vlm" / "conversations.jsonl"), PROCESSOR, seq_len=256,
                                 packing="none")
    dm.setup("fit")
    tok = dm.renderer.tokenizer
    ids_of = tok.convert_tokens_to_ids
    spec = dict(MODELS["qwen3_vl"], image_token_id=ids_of("<|image_pad|>"), video_token_id=ids_of("<|video_pad|>"),
                vision_start_token_id=ids_of("<|vision_start|>"), vision_end_token_id=ids_of("<|vision_end|>"),
                text_config=dict(MODELS["qwen3_vl"]["text_config"], vocab_size=len(tok)),
                vision_config=dict(MODELS["qwen3_vl"]["vision_config"], patch_size=dm.renderer.image_processor.patch_size))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                                    attn_implementation="sdpa")
    rows = dm._rows["train"]
    expected = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            out = model(input_ids=ids, pixel_values=row["pixel_values"], image_grid_thw=row["image_grid_thw"],
                        mm_token_type_ids=(ids == spec["image_token_id"]).int(), labels=torch.tensor([row["labels"]]))
            expected.append(float(out.loss))
    module = CausalLMModule(model, attn_implementation="sdpa", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    losses = _fit_one_process(module, datamodule=dm)
    assert sorted(losses) == pytest.approx(sorted(expected), rel=1e-4)
    # its videos need per-frame-group timestamps: refused by name (a stand-in for Qwen3-VL's video processor, which
    # needs torchvision)
    renderer = dm.renderer
    renderer.video_processor = type("Qwen3VLVideoProcessor", (), {})()
    with pytest.raises(ValueError, match="Qwen3-VL images but not videos"):
        renderer.encode("video", [torch.zeros(2, 8, 8, 3)])


def test_tiled_mlp_keeps_to_the_language_models_layers() -> None:
    """The tiled MLP tiles the decoder layers' MLPs only: the tower's merger (``merger.mlp``, 4 x width -> the
    language model's width) is no ``[..., h] -> [..., h]`` MLP and its blocks run on patches (found on an H100:
    ``memory: auto`` picked the fully tiled plan for a Qwen2.5-VL at 64K tokens and the swap refused the merger)."""
    from lightning_ulysses.memory.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp

    model = _model("qwen2_5_vl")
    assert enable_tiled_mlp(model) == 2  # the text config's two layers
    disable_tiled_mlp(model)


def test_segment_attention_equals_one_call_per_segment() -> None:
    """Segments of several lengths (batched per length, then put back in order) and of one length (a view): the
    outputs and the gradients of q, k, v are those of one sdpa call per segment."""
    import torch.nn.functional as F

    from lightning_ulysses.kernels.segments import segment_attention

    torch.manual_seed(0)
    for bounds in ([0, 64, 128, 160, 224, 240, 304], [0, 16, 32, 48, 64]):
        q, k, v = (torch.randn(1, 4, bounds[-1], 8, requires_grad=True) for _ in range(3))
        cu = torch.tensor(bounds)
        out, _ = segment_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        ref = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.3)
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=2).transpose(1, 2)
        assert out.shape == (1, bounds[-1], 4, 8)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal"):
        segment_attention(None, q, q, q, cu_seq_lens_q=torch.tensor([0, 4, 8]), cu_seq_lens_k=torch.tensor([0, 2, 8]))
    with pytest.raises(ValueError, match="not an attention mask"):
        segment_attention(None, q, q, q, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_tower_attends_per_window_size_and_is_handed_back_on_sdpa(name) -> None:
    """Under sdpa a Qwen-VL tower runs the segment attention while the strategy holds the model (the same features
    and gradients as transformers' one call per window / frame group), and sdpa again afterwards; eager is left
    alone."""
    from lightning_ulysses.models.multimodal import TOWER_ATTENTION, apply_multimodal, remove_multimodal

    torch.manual_seed(0)
    model = _model(name).float()
    tower = model.model.visual
    spec = MODELS[name]["vision_config"]
    merge = spec.get("spatial_merge_size", 2)
    # frames of 8 x 8 and 8 x 10 patches: Qwen2.5-VL's 4 x 4-patch windows come in three sizes, frame groups in two
    grid = torch.tensor([[2, 4 * merge, 4 * merge], [1, 4 * merge, 5 * merge]])
    width = spec.get("in_channels", 3) * spec.get("temporal_patch_size", 2) * spec.get("patch_size", 14) ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), width)

    def run() -> tuple[torch.Tensor, dict]:
        from lightning_ulysses.models.multimodal import _merged

        tower.zero_grad(set_to_none=True)
        out = _merged(tower(pixels, grid_thw=grid))
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    apply_multimodal(model)
    assert tower.config._attn_implementation == TOWER_ATTENTION
    batched, batched_grads = run()
    remove_multimodal(model)
    assert tower.config._attn_implementation == "sdpa"
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == batched_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(batched_grads[n], plain_grads[n], rtol=1e-5, atol=1e-6)
    tower.config._attn_implementation = "eager"
    apply_multimodal(model)
    assert tower.config._attn_implementation == "eager"
    remove_multimodal(model)


def test_checkpointing_leaves_a_frozen_tower_without_a_graph() -> None:
    """transformers' input-grads hook (added when checkpointing is enabled) would sit on the tower's patch embedding
    too, making a frozen tower build its whole graph (every block's input kept, a recompute and backward for nothing):
    non-reentrant checkpointing needs none, so neither embedding keeps it, and the tower's blocks see inputs that need
    no gradient."""
    from lightning_ulysses.memory.activation_checkpoint import enable_gradient_checkpointing
    from lightning_ulysses.models.multimodal import freeze_vision

    model = _model("qwen2_5_vl").float()
    freeze_vision(model, tower=True, projector=False)
    enable_gradient_checkpointing(model)
    tower = model.model.visual
    assert not tower.patch_embed._forward_hooks
    assert not model.get_input_embeddings()._forward_hooks
    seen = []
    tower.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"])
                                                                          .requires_grad), with_kwargs=True)
    grid = torch.tensor([[2, 8, 8]])
    tower(torch.randn(int(grid.prod()), PATCH), grid_thw=grid)
    assert seen == [False]


def test_frozen_tower_blocks_are_zero3_leaves_and_trained_ones_are_not() -> None:
    """The flags follow what is frozen at each call (a later fit that trains the tower unflags its blocks), and a text
    model or a LLaVA tower's trained blocks get none."""
    from lightning_ulysses.models.multimodal import freeze_vision, zero3_leaf_tower_blocks

    model = _model("qwen2_5_vl")
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2_5_VLVisionBlock"]
    assert zero3_leaf_tower_blocks(model) == 0 and not any(getattr(b, "_z3_leaf", False) for b in blocks)
    freeze_vision(model, tower=True, projector=False)
    assert zero3_leaf_tower_blocks(model) == len(blocks) == model.config.vision_config.depth
    assert all(b._z3_leaf for b in blocks)
    assert not getattr(model.model.visual.merger, "_z3_leaf", False)  # the projector trains: not a leaf
    for p in model.parameters():
        p.requires_grad_(True)
    assert zero3_leaf_tower_blocks(model) == 0 and not any(b._z3_leaf for b in blocks)
    assert zero3_leaf_tower_blocks(_model("llava")) == 0
