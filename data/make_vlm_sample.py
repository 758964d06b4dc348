"""Build the small vision-language sample in ``data/vlm/`` (no download): run from the repo root,
``python data/make_vlm_sample.py``. Deterministic: the committed files are exactly what it writes.

* ``processor/``: a Qwen2-VL-style processor for tiny models: ``data/tokenizer`` with the four vision tokens added
  (``<|vision_start|>`` 512, ``<|vision_end|>`` 513, ``<|image_pad|>`` 514, ``<|video_pad|>`` 515), a chat template
  that renders ``{"type": "image"}`` items and marks assistant turns, and a Qwen2-VL image processor with 4-pixel
  patches, merge 2 (a 32x32 image -> an 8x8 grid -> 16 tokens);
* ``images/``: generated 32x32 PNGs, a coloured shape on a background;
* ``conversations.jsonl``: questions about those images (``messages`` with image items, ``images`` column);
* ``videos/clip.npy`` + ``videos.jsonl``: a short synthetic video (8 frames, 32x32) and a conversation about it (videos
  need transformers' video processor, i.e. torchvision).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "vlm"
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ["square", "stripe", "dot"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}<|assistant|>{% generation %}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}"
    "<|end|>{% endgeneration %}"
    "{%- else -%}<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def image(color: str, shape: str, rng: random.Random) -> np.ndarray:
    px = np.full((32, 32, 3), 235, dtype=np.uint8)
    c = COLORS[color]
    x, y = rng.randrange(4, 16), rng.randrange(4, 16)
    if shape == "square":
        px[y : y + 12, x : x + 12] = c
    elif shape == "stripe":
        px[y : y + 4, :] = c
    else:
        yy, xx = np.mgrid[:32, :32]
        px[(yy - y - 6) ** 2 + (xx - x - 6) ** 2 < 30] = c
    return px


def processor() -> None:
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(HERE / "tokenizer"))
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(OUT / "processor"))
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32,
                             max_pixels=32 * 32).save_pretrained(str(OUT / "processor"))


def main() -> None:
    from PIL import Image

    rng = random.Random(0)
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    (OUT / "videos").mkdir(parents=True, exist_ok=True)
    processor()
    rows = []
    for i in range(24):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        name = f"images/{i:02d}.png"
        Image.fromarray(image(color, shape, rng)).save(OUT / name)
        if i % 3 == 2:  # two images in one conversation
            other = rows[-1]["images"][0]
            q = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is in the second picture?"}]
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": [{"type": "text", "text": f"a {color} {shape}"}]}],
                         "images": [other, name]})
        else:
            q = [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": [{"type": "text", "text": f"It is {color}."}]}],
                         "images": [name]})
    (OUT / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frames = np.stack([image("blue", "dot", random.Random(k)) for k in range(8)])  # a dot that jumps around
    np.save(OUT / "videos" / "clip.npy", frames)
    video = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a blue dot"}]}],
             "videos": ["videos/clip.npy"]}
    (OUT / "videos.jsonl").write_text(json.dumps(video) + "\n")


if __name__ == "__main__":
    main()
