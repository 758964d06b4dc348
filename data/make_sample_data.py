"""Build the small datasets and the tokenizer that ship in ``data/`` (no download): run from the repo root,
``python data/make_sample_data.py``. Deterministic: the committed files are exactly what it writes.

* ``conversations.jsonl``: chats in the ``messages`` format (system / user / assistant turns) about arithmetic,
  colours and counting -- patterns a tiny model learns in a few dozen steps;
* ``prompt_completion.jsonl``: the same facts as ``prompt`` / ``completion`` pairs;
* ``documents.jsonl``: long documents (``text``), a few thousand tokens each, of varied length;
* ``tokenizer/``: a byte-level BPE tokenizer trained on those files with the ``tokenizers`` library, saved for
  ``AutoTokenizer.from_pretrained("data/tokenizer")``, with a chat template that marks assistant turns
  (``{% generation %}``) so ``return_assistant_tokens_mask`` works.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["apple", "car", "house", "bird", "stone", "cloud", "boat", "lamp"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
SPECIAL = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        thing, color = rng.choice(THINGS), rng.choice(COLORS)
        return f"What colour is the {thing} in the story?", f"The {thing} in the story is {color}."
    n = rng.randrange(2, 9)
    return f"Count to {n}.", " ".join(str(i) for i in range(1, n + 1)) + "."


def conversations(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You answer briefly."}] if rng.random() < 0.5 else []
        for _ in range(rng.randrange(1, 4)):
            q, a = fact(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages})
    return out


def documents(n: int, rng: random.Random) -> list[dict]:
    out = []
    for d in range(n):
        sentences = []
        for _ in range(rng.randrange(40, 400)):
            thing, color = rng.choice(THINGS), rng.choice(COLORS)
            a, b = rng.randrange(50), rng.randrange(50)
            sentences.append(rng.choice([
                f"The {thing} was {color}.",
                f"Then {a} and {b} made {a + b}.",
                f"Every {thing} near the {rng.choice(THINGS)} turned {color}.",
                f"After {a} days the {thing} was still {color}.",
            ]))
        out.append({"text": f"Document {d}. " + " ".join(sentences)})
    return out


def build_tokenizer(files: list[Path], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def main() -> None:
    rng = random.Random(0)
    files = {
        "conversations.jsonl": conversations(400, rng),
        "prompt_completion.jsonl": [dict(zip(("prompt", "completion"), fact(rng))) for _ in range(400)],
        "documents.jsonl": documents(64, rng),
    }
    for name, rows in files.items():
        with open(HERE / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    build_tokenizer([HERE / n for n in files], HERE / "tokenizer")


if __name__ == "__main__":
    main()
