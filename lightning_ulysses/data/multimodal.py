"""``MultimodalSFTDataModule``: conversations with images (and videos) for vision-language models, as rows the
strategy shards after the vision features are merged (:mod:`lightning_ulysses.models.multimodal`).

Data (TRL's vision SFT format): ``messages`` whose contents are lists of ``{"type": "text", "text": ...}``,
``{"type": "image"}`` and ``{"type": "video"}`` items, with an ``images`` (``videos``) column listing the files in the
order of those items (paths relative to the data file's folder, or ``media_root``); an item may also name its file
itself (``{"type": "image", "image": "cat.png"}``). Videos are ``.npy`` arrays ``[frames, H, W, 3]`` (uint8) or lists
of frame images.

A sample is rendered with the processor's chat template, the loss mask found as for text conversations
(:func:`lightning_ulysses.data.formats.tokenize_sample`: assistant tokens only), then each image / video placeholder
token is expanded to as many tokens as the vision tower gives features (Qwen-VL: ``t * h * w / merge^2`` of the image
processor's grid), never labelled. Rows pack whole samples (best fit) with positions restarting per sample (the
model's 3-D positions restart with them); a sample longer than ``seq_len`` is an error or dropped (``too_long``),
never cut (a cut would split an image from its tokens). Each row carries its samples' pixels; a batch concatenates
them in row order, the order of the placeholders.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_ulysses.data.formats import labels_from_mask, tokenize_sample
from lightning_ulysses.data.modules import collate_rows, load_data
from lightning_ulysses.data.packing import PackingStats, _row, best_fit_decreasing
from lightning_ulysses.data.tokenizer import load_tokenizer
from lightning_ulysses.errors import errors_reported_once

MULTIMODAL_PACKINGS = ("best_fit", "none")
MULTIMODAL_TOO_LONG = ("error", "drop")
# Qwen-VL, per source: the placeholder token of the chat template, the processor's pixel and grid outputs
SOURCES = {"image": ("<|image_pad|>", "pixel_values", "image_grid_thw"),
           "video": ("<|video_pad|>", "pixel_values_videos", "video_grid_thw")}


class Renderer:
    """A vision-language processor's parts, in one of two kinds:

    * Qwen-VL (an image processor with ``merge_size``): its tokenizer (with the chat template), image processor and,
      where transformers can build one, its video processor (transformers' video processors need torchvision). The
      parts are used instead of the processor object because that object cannot be built at all without torchvision,
      while images need only the image processor. Each image / video gives ``t * h * w / merge^2`` tokens.
    * a processor that expands its image token itself (LLaVA's: ``image_token``, a fixed token count per image from
      ``patch_size`` and the feature strategy): images only; the count per image is read off the processor's own
      expansion of one placeholder per image.

    :attr:`placeholders` maps each source the processor renders to its placeholder token and id;
    :meth:`encode` gives a sample's vision tensors and each item's token count."""

    def __init__(self, processor: Any) -> None:
        self.processor: Any = None  # the expanding kind's processor object
        if isinstance(processor, (str, Path)):
            self._load(str(processor))
        else:  # a processor object
            self.tokenizer, self.image_processor = load_tokenizer(processor.tokenizer), processor.image_processor
            self.video_processor = getattr(processor, "video_processor", None)
            if getattr(self.tokenizer, "chat_template", None) is None:
                self.tokenizer.chat_template = processor.chat_template
            if getattr(self.image_processor, "merge_size", None) is None:
                self.processor = processor
        self.merge = int(getattr(self.image_processor, "merge_size", None) or 1)
        if self.processor is None:
            tokens = {source: token for source, (token, _, _) in SOURCES.items()}
        elif isinstance(getattr(self.processor, "image_token", None), str):
            tokens = {"image": self.processor.image_token}
        else:
            raise ValueError(
                f"MultimodalSFTDataModule renders Qwen-VL processors (a grid-based image processor with merge_size) and "
                f"processors that expand an `image_token` themselves (LLaVA's); {type(self.processor).__name__} is "
                "neither. For other families build batches with the model's own processor (input_ids, labels with "
                "-100 on image tokens, pixel_values)."
            )
        self.placeholders: dict[str, tuple[str, int]] = {}
        for source, token in tokens.items():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"The processor's tokenizer has no {token!r} token: not a processor of a supported "
                                 "vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA).")
            self.placeholders[source] = (token, token_id)

    def _load(self, path: str) -> None:
        from transformers import AutoImageProcessor

        self.tokenizer = load_tokenizer(path)  # with a pad token, and an EOS token checked
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(path)
        except OSError as exc:
            raise ValueError(f"{path} has no image processor (preprocessor_config.json): give the "
                             "vision-language model's processor (its hub name or directory).") from exc
        self.video_processor = _video_processor(path)
        template = Path(path) / "chat_template.jinja"
        if getattr(self.tokenizer, "chat_template", None) is None and template.is_file():
            self.tokenizer.chat_template = template.read_text()
        if getattr(self.image_processor, "merge_size", None) is None:  # an expanding processor: built whole
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(path)
            self.processor.tokenizer = self.tokenizer

    def encode(self, source: str, items: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """A sample's images (``source="image"``) or videos: their tensors, and each one's token count."""
        if self.processor is not None:  # the processor's own expansion of one placeholder per image (newline apart)
            token, token_id = self.placeholders[source]
            out = self.processor(text="\n".join([token] * len(items)), images=items, return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            counts = [len(list(run)) for t, run in itertools.groupby(ids) if t == token_id]
            if len(counts) != len(items):
                raise ValueError(f"{type(self.processor).__name__} expanded {len(items)} image placeholders into "
                                 f"{len(counts)} runs: not a processor that expands each image in place.")
            return {"pixel_values": out["pixel_values"]}, counts
        _, pixel_key, grid_key = SOURCES[source]
        if source == "image":
            out = dict(self.image_processor(images=items, return_tensors="pt"))
        elif self.video_processor is None:
            raise ValueError(
                "Videos need transformers' video processor, which needs torchvision: install the torchvision build "
                "matching your torch (pip install torchvision==<the release paired with your torch>)."
            )
        elif type(self.video_processor).__name__.startswith("Qwen3VL"):
            # its processor writes "<t seconds>" before each frame group, a run of placeholders per group, with t
            # from the video's sampling metadata; one run per video would be refused by the strategy
            raise ValueError(
                "MultimodalSFTDataModule renders Qwen3-VL images but not videos (each frame group needs its timestamp "
                "text from the video's metadata): build video rows with the model's own processor (input_ids, labels "
                "with -100 on vision tokens, pixel_values_videos, video_grid_thw)."
            )
        else:
            out = dict(self.video_processor(videos=items, return_tensors="pt", do_sample_frames=False))
        vision = {pixel_key: out[pixel_key], grid_key: out[grid_key]}
        if "second_per_grid_ts" in out:
            vision["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"])
        return vision, (out[grid_key].prod(-1) // (self.merge * self.merge)).tolist()


def _video_processor(path: str) -> Any:
    try:
        from transformers import AutoVideoProcessor

        return AutoVideoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, AttributeError):
        return None  # no torchvision, or a processor without videos: images still work


class MultimodalSFTDataModule(LightningDataModule):
    """Conversations with images / videos packed into rows of ``seq_len`` tokens for a vision-language model.

    Args:
        data: a ``.json`` / ``.jsonl`` / ``.parquet`` file (or several), a saved dataset directory or a hub name.
        processor: the model's processor: a directory or hub name (Qwen2-VL / Qwen2.5-VL: images and videos;
            Qwen3-VL, LLaVA: images), or a processor object.
        seq_len: tokens per row; a sample (its vision tokens included) must fit.
        packing: ``"best_fit"`` (several whole samples per row) or ``"none"`` (one sample per row).
        too_long: a sample longer than ``seq_len``: ``"error"`` (default) or ``"drop"`` (counted and logged).
        batch_size: rows per micro-batch (their pixels are concatenated in row order).
        val_size: samples held out for validation (an int, or a fraction); ``val_data`` instead names its files.
        assistant_only_loss: labels on the assistant turns only (``False``: every text token).
        media_root: the folder image / video paths are relative to (default: the data file's folder).
        split, seed, num_workers: as :class:`~lightning_ulysses.data.SFTDataModule`.
    """

    @errors_reported_once
    def __init__(
        self,
        data: Union[str, list[str]],
        processor: Any,
        seq_len: int = 4096,
        packing: str = "best_fit",
        too_long: str = "error",
        batch_size: int = 1,
        val_size: Union[int, float] = 0,
        val_data: Optional[Union[str, list[str]]] = None,
        assistant_only_loss: bool = True,
        media_root: Optional[str] = None,
        split: str = "train",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if packing not in MULTIMODAL_PACKINGS:
            raise ValueError(f"packing must be one of {list(MULTIMODAL_PACKINGS)} for multimodal samples, got {packing!r}.")
        if too_long not in MULTIMODAL_TOO_LONG:
            raise ValueError(f"too_long must be one of {list(MULTIMODAL_TOO_LONG)} (a sample with images is never cut), "
                             f"got {too_long!r}.")
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}.")
        self.data, self.processor_spec, self.seq_len = data, processor, seq_len
        self.packing, self.too_long, self.batch_size = packing, too_long, batch_size
        self.val_size, self.val_data, self.assistant_only_loss = val_size, val_data, assistant_only_loss
        self.media_root, self.split, self.seed, self.num_workers = media_root, split, seed, num_workers
        self.renderer: Optional[Renderer] = None
        self.stats: dict[str, PackingStats] = {}
        self._rows: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------------------------------- samples
    def _root(self, data: Union[str, list[str]]) -> Path:
        if self.media_root is not None:
            return Path(self.media_root)
        first = Path(data if isinstance(data, str) else data[0])
        return first.parent if first.suffix else first

    def sample(self, sample: dict, root: Path, index: int) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """One conversation -> ``(input_ids, labels, vision tensors)`` with the placeholders expanded."""
        r = self.renderer
        messages, media = _media_items(sample, index)
        ids, mask = tokenize_sample({"messages": messages}, r.tokenizer, "messages", self.assistant_only_loss)
        vision: dict[str, torch.Tensor] = {}
        counts: dict[str, list[int]] = {}
        for kind in ("image", "video"):
            if kind not in r.placeholders and media[kind]:
                raise ValueError(f"Sample {index} has {kind}s, which {type(r.processor).__name__} does not render "
                                 f"(it expands images only): leave them out, or use a Qwen-VL model.")
        for source, (token, token_id) in r.placeholders.items():
            files = media[source]
            placeholders = sum(1 for t in ids if t == token_id)
            if placeholders != len(files):
                raise ValueError(
                    f"Sample {index}: {placeholders} {source} placeholder(s) ({{'type': '{source}'}} items rendered as "
                    f"{token}) for {len(files)} {source} file(s) in its '{source}s' column; give one file per item, in order."
                )
            if not files:
                continue
            out, counts[source] = r.encode(source, [_load(source, root / f if not Path(f).is_absolute() else Path(f),
                                                          index) for f in files])
            vision.update(out)
        expanded, expanded_mask, seen = [], [], {s: 0 for s in r.placeholders}
        for t, m in zip(ids, mask):
            source = next((s for s, (_, token_id) in r.placeholders.items() if t == token_id), None)
            if source is None:
                expanded.append(t)
                expanded_mask.append(m)
            else:  # the placeholder becomes one token per feature of its image / video, never a label
                n = counts[source][seen[source]]
                seen[source] += 1
                expanded += [t] * n
                expanded_mask += [0] * n
        return expanded, labels_from_mask(expanded, expanded_mask), vision

    def _rows_of(self, dataset: Any, root: Path) -> tuple[list[dict], PackingStats]:
        stats = PackingStats()
        samples = []
        for index, raw in enumerate(dataset):
            stats.samples += 1
            ids, labels, vision = self.sample(raw, root, index)
            if len(ids) > self.seq_len:
                if self.too_long == "error":
                    raise ValueError(
                        f"Sample {index} has {len(ids)} tokens (its vision tokens included), more than "
                        f"seq_len={self.seq_len}. Raise seq_len, or set too_long='drop' (such samples are left out and "
                        "counted). A sample with images is never cut."
                    )
                stats.dropped += 1
                continue
            samples.append((ids, labels, vision))
        pad = self.renderer.tokenizer.pad_token_id
        if self.packing == "none":
            groups = [[i] for i in range(len(samples))]
        else:
            groups = [sorted(g) for g in best_fit_decreasing([len(s[0]) for s in samples], self.seq_len)]
        rows = []
        for group in groups:
            row: dict[str, Any] = _row([(samples[i][0], samples[i][1]) for i in group],
                                       self.seq_len if self.packing != "none" else None, pad)
            for key in {k for i in group for k in samples[i][2]}:  # pixels in sample order: the placeholders' order
                row[key] = torch.cat([samples[i][2][key].reshape(-1, *samples[i][2][key].shape[1:])
                                      for i in group if key in samples[i][2]])
            rows.append(row)
        stats.rows = len(rows)
        stats.real_tokens = sum(len(s[0]) for s in samples)
        stats.row_tokens = sum(len(r["input_ids"]) for r in rows)
        return rows, stats

    # ------------------------------------------------------------------------------------------- Lightning
    @errors_reported_once
    def setup(self, stage: str) -> None:
        if self._rows:
            return
        self.renderer = Renderer(self.processor_spec)
        train = load_data(self.data, self.split)
        val = load_data(self.val_data, self.split) if self.val_data is not None else None
        if val is None and self.val_size:
            parts = train.train_test_split(test_size=self.val_size, seed=self.seed)
            train, val = parts["train"], parts["test"]
        for name, ds, data in (("train", train, self.data), ("val", val, self.val_data or self.data)):
            if ds is None:
                continue
            self._rows[name], self.stats[name] = self._rows_of(ds, self._root(data))
            rank_zero_info(f"MultimodalSFTDataModule [{name}]: {self.stats[name].describe()}")

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(_Rows(self._rows[name]), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          collate_fn=functools.partial(collate_multimodal, pad_id=self.renderer.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", shuffle=False) if "val" in self._rows else []


class _Rows(Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: torch.tensor(v, dtype=torch.long) if isinstance(v, list) else v for k, v in self.rows[i].items()}


def collate_multimodal(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Text as :func:`~lightning_ulysses.data.modules.collate_rows`; vision tensors concatenated in row order (a
    batch's placeholders, read row by row, meet its images in that order)."""
    text = ("input_ids", "labels", "position_ids")
    out = collate_rows([{k: r[k] for k in text} for r in batch], pad_id)
    for key in {k for r in batch for k in r if k not in text}:
        out[key] = torch.cat([r[key] for r in batch if key in r])
    return out


def _media_items(sample: dict, index: int) -> tuple[list, dict[str, list]]:
    """The messages (contents as item lists) and the files of each source in item order: inline names first come
    where they stand, the rest from the ``images`` / ``videos`` columns in order."""
    messages = sample.get("messages")
    if not isinstance(messages, list):
        raise ValueError(f"Sample {index} has no 'messages' list (TRL's conversational format with image items).")
    columns = {s: list(sample.get(f"{s}s") or []) for s in SOURCES}
    media: dict[str, list] = {s: [] for s in SOURCES}
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in SOURCES:
                    named = item.get(kind)
                    if named is None and not columns[kind]:
                        raise ValueError(f"Sample {index}: more {{'type': '{kind}'}} items than files in its '{kind}s' column.")
                    media[kind].append(named if named is not None else columns[kind].pop(0))
        out.append(message)
    for kind, left in columns.items():
        if left:
            raise ValueError(f"Sample {index}: {len(left)} file(s) in '{kind}s' have no {{'type': '{kind}'}} item in "
                             "the messages; each file needs its place in the conversation.")
    return out, media


def _load(source: str, path: Path, index: int) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"Sample {index}: {source} file {path} not found (paths are relative to the data file's "
                                "folder, or to media_root).")
    if source == "image":
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".json":  # a list of frame image files
        from PIL import Image

        return [np.asarray(Image.open(path.parent / f).convert("RGB")) for f in json.loads(path.read_text())]
    raise ValueError(f"Sample {index}: video {path} must be a .npy array [frames, H, W, 3] or a .json list of frames.")


__all__ = ["MULTIMODAL_PACKINGS", "MULTIMODAL_TOO_LONG", "MultimodalSFTDataModule", "collate_multimodal"]
