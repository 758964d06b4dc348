"""SFT and pretraining data (issue #17): rendering and loss masks per format, checked token by token against the
chat template's own rendering; packing with no prediction across samples; nothing cut silently; the data modules
on the data and tokenizer shipped in data/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_ulysses.data import PretrainDataModule, SFTDataModule, pack
from lightning_ulysses.data.formats import detect_format, tokenize_sample
from lightning_ulysses.data.modules import collate_rows
from lightning_ulysses.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "tokenizer")
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "Count to 3."},
    {"role": "assistant", "content": "1 2 3."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def _loss_text(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_messages_loss_is_exactly_the_assistant_tokens_of_the_templates_rendering(tok) -> None:
    ids, mask = tokenize_sample({"messages": CHAT}, tok, "messages")
    rendered = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(rendered["input_ids"]) and mask == list(rendered["assistant_masks"])
    assert _loss_text(tok, ids, mask) == "2 plus 3 is 5.<|end|>1 2 3.<|end|>"
    # a template without {% generation %} markers: the same tokens found by rendering prefixes
    plain = load_tokenizer(TOKENIZER, chat_template=tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    assert tokenize_sample({"messages": CHAT}, plain, "messages") == (ids, mask)
    everything = tokenize_sample({"messages": CHAT}, tok, "messages", assistant_only_loss=False)[1]
    assert all(everything)


# Chat templates in the shapes real models ship, written here as Jinja ({G}/{E}: where a TRL-style template puts
# {% generation %} / {% endgeneration %}: around the content and the end-of-turn token, not the text after it; a
# newline after a block tag is an expression, as transformers renders templates with trim_blocks).
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{G}{{ m.content }}"
               "<|im_end|>{E}{{ '\\n' }}{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
               "{% if m.role == 'assistant' %}{G}{{ m.content | trim }}<|eot_id|>{E}{% else %}{{ m.content | trim }}"
               "<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
               "<|end_header_id|>\n\n{% endif %}", "<|eot_id|>"),
    "mistral": ("<s>{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
                "{% elif m.role == 'assistant' %}{G}{{ m.content }}</s>{E}{% endif %}{% endfor %}", "</s>"),
    "gemma": ("<bos>{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
              "<start_of_turn>{{ role }}\n{% if m.role == 'assistant' %}{G}{{ m.content }}<end_of_turn>{E}{{ '\\n' }}"
              "{% else %}{{ m.content }}<end_of_turn>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "<end_of_turn>"),
    "phi3": ("{% for m in messages %}<|{{ m.role }}|>\n{% if m.role == 'assistant' %}{G}{{ m.content }}<|end|>{E}{{ '\\n' }}"
             "{% else %}{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}", "<|end|>"),
}
TURN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<start_of_turn>", "<end_of_turn>",
               "<|endoftext|>"]


@pytest.mark.parametrize("shape", sorted(TEMPLATES))
def test_assistant_labels_are_content_and_end_of_turn_with_and_without_generation_marks(shape: str) -> None:
    template, eot = TEMPLATES[shape]
    chat = [m for m in CHAT if m["role"] != "system"] if shape in ("mistral", "gemma") else CHAT
    masks = {}
    for marked in (True, False):
        tok = load_tokenizer(TOKENIZER, chat_template=template.replace("{G}", "{% generation %}" if marked else "")
                             .replace("{E}", "{% endgeneration %}" if marked else ""))
        tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
        tok.eos_token = "<|endoftext|>" if shape == "phi3" else tok.eos_token
        ids, mask = tokenize_sample({"messages": chat}, tok, "messages")
        assert ids == list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        turns = [t["content"] + eot for t in chat if t["role"] == "assistant"]
        assert _loss_text(tok, ids, mask) == "".join(turns), (shape, marked)  # nothing after the end of turn
        masks[marked] = mask
    assert masks[True] == masks[False], shape


def test_a_conversation_without_an_assistant_turn_names_its_roles(tok) -> None:
    bot = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]
    with pytest.raises(ValueError, match=r"no 'assistant' turn \(its roles: \['bot', 'user'\]\).*rename the role"):
        tokenize_sample({"messages": bot}, tok, "messages")
    assert all(tokenize_sample({"messages": bot}, tok, "messages", assistant_only_loss=False)[1])
    with pytest.raises(ValueError, match="A completion has no 'assistant' turn"):
        tokenize_sample({"prompt": bot[:1], "completion": bot[1:]}, tok, "prompt_completion")


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix(tok) -> None:
    odd = load_tokenizer(TOKENIZER, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages|length }}")
    with pytest.raises(ValueError, match="generation"):
        tokenize_sample({"messages": CHAT}, odd, "messages")


def test_prompt_completion_loss_is_the_completion_and_eos(tok) -> None:
    ids, mask = tokenize_sample({"prompt": "What is 1 plus 1?", "completion": " 1 plus 1 is 2."}, tok, "prompt_completion")
    assert _loss_text(tok, ids, mask) == " 1 plus 1 is 2.<|end|>"
    assert tok.decode(ids) == "What is 1 plus 1? 1 plus 1 is 2.<|end|>"
    conv = {"prompt": CHAT[:2], "completion": CHAT[2:3]}
    ids, mask = tokenize_sample(conv, tok, "prompt_completion")
    assert ids == list(tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True)["input_ids"])
    assert _loss_text(tok, ids, mask) == "2 plus 3 is 5.<|end|>"


def test_text_is_all_loss_with_eos_and_formats_are_detected(tok) -> None:
    ids, mask = tokenize_sample({"text": "The car was red."}, tok, "text")
    assert ids[-1] == tok.eos_token_id and all(mask)
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text"]) == "text"
    with pytest.raises(ValueError, match="rename_column"):
        detect_format(["question", "answer"])
    with pytest.raises(ValueError, match="needs the column"):
        detect_format(["text"], "messages")


def _samples(lengths):
    return [(list(range(100 * i, 100 * i + n)), list(range(100 * i, 100 * i + n))) for i, n in enumerate(lengths)]


def test_best_fit_packing_keeps_every_sample_once_restarts_positions_and_masks_boundaries() -> None:
    lengths = [7, 3, 5, 2, 9, 4, 1, 6]
    rows, stats = pack(_samples(lengths), seq_len=10, pad_id=0, packing="best_fit")
    assert all(len(r["input_ids"]) == 10 for r in rows)
    seen = Counter()
    for r in rows:
        starts = [t for t, p in enumerate(r["position_ids"]) if p == 0]
        for t in starts:
            assert r["labels"][t] == -100, "a sample's first token must not be predicted from the previous sample"
        for t, tok_id in enumerate(r["input_ids"]):
            if r["labels"][t] != -100:
                seen[tok_id // 100] += 1
    # every sample's tokens but its first are labels, exactly once
    assert seen == Counter({i: n - 1 for i, n in enumerate(lengths) if n > 1})
    assert stats.rows == len(rows) == 4 and stats.real_tokens == sum(lengths)  # 9+1, 7+3, 6+4, 5+2: optimal
    assert stats.efficiency == pytest.approx(sum(lengths) / 40)


def test_nothing_longer_than_seq_len_is_cut_silently() -> None:
    rows, stats = pack(_samples([25, 4]), seq_len=10, pad_id=0, too_long="split")
    assert stats.split == 1 and stats.real_tokens == 29  # pieces of 10, 10 and 5 tokens, each its own sample
    assert sorted(sum(1 for p in r["position_ids"] if p == 0) for r in rows) == [1, 1, 2]
    _, stats = pack(_samples([25, 4]), seq_len=10, pad_id=0, too_long="drop")
    assert stats.dropped == 1 and stats.real_tokens == 4
    with pytest.raises(ValueError, match="too_long='split'"):
        pack(_samples([25, 4]), seq_len=10, pad_id=0, too_long="error")
    rows, stats = pack(_samples([25, 4]), seq_len=10, pad_id=0, packing="concat")
    assert [len(r["input_ids"]) for r in rows] == [10, 10, 10] and stats.real_tokens == 29


def test_unpacked_rows_are_padded_per_batch_with_a_mask() -> None:
    rows, _ = pack(_samples([3, 5]), seq_len=10, pad_id=0, packing="none")
    batch = collate_rows([{k: torch.tensor(v) for k, v in r.items()} for r in rows], pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0, 3:].tolist() == [-100, -100] and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("fmt_file", ["conversations.jsonl", "prompt_completion.jsonl"])
def test_sft_module_on_the_shipped_data(fmt_file: str) -> None:
    dm = SFTDataModule(str(ROOT / "data" / fmt_file), TOKENIZER, seq_len=256, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 256) and batch["position_ids"].shape == (2, 256)
    assert 0.9 < dm.stats["train"].efficiency <= 1.0
    assert len(dm.val_dataloader()) >= 1


def test_pretrain_module_reads_files_and_saved_datasets(tmp_path) -> None:
    import datasets

    docs = [json.loads(line) for line in open(ROOT / "data" / "documents.jsonl")][:8]
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(docs).to_parquet(str(tmp_path / "docs.parquet"))
    for data in (str(tmp_path / "saved"), str(tmp_path / "docs.parquet")):
        dm = PretrainDataModule(data, TOKENIZER, seq_len=512, packing="concat", val_size=0)
        dm.setup("fit")
        rows = dm._rows["train"]
        assert all(r["input_ids"].shape == (512,) for r in (rows[i] for i in range(len(rows) - 1)))
        assert dm.stats["train"].samples == 8 and dm.val_dataloader() == []
    with pytest.raises(ValueError, match="text_column"):
        PretrainDataModule(str(tmp_path / "docs.parquet"), TOKENIZER, text_column="body").setup("fit")


def test_rows_stay_open_across_buffers_so_short_samples_fill_long_rows() -> None:
    # 300 samples of 10 tokens, buffers of 50 (500 tokens), rows of 1000: a buffer alone never fills a row
    rows, stats = pack(_samples([10] * 300), seq_len=1000, pad_id=0, buffer=50)
    assert stats.rows == 3 and stats.efficiency == 1.0
