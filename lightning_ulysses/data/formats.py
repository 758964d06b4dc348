"""Samples -> token ids and a loss mask, for the formats TRL accepts.

* ``messages``: a conversation (``[{"role": ..., "content": ...}, ...]``) rendered with the tokenizer's chat
  template; by default only assistant turns are in the loss (their content and the template's end-of-turn token,
  not the ``assistant`` header).
* ``prompt`` / ``completion``: strings (the completion followed by EOS) or conversations (a prompt conversation and
  the completion turns); by default only the completion is in the loss.
* ``text``: plain text followed by EOS, every token in the loss.

Which tokens are the assistant's comes from the template itself: when it marks them (``{% generation %}``),
transformers' ``return_assistant_tokens_mask``; otherwise by rendering each conversation prefix and checking
that every rendering is a prefix of the next (a template that rewrites earlier turns cannot be masked this way and
is refused, naming the fix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

FORMATS = ("messages", "prompt_completion", "text")


def detect_format(columns: Sequence[str], fmt: str = "auto") -> str:
    """The sample format from the dataset's columns (``fmt="auto"``), or ``fmt`` checked against them."""
    cols = set(columns)
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {list(FORMATS)}, got {fmt!r}.")
        need = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"}, "text": {"text"}}[fmt]
        if not need <= cols:
            raise ValueError(f"format={fmt!r} needs the column(s) {sorted(need)}; the dataset has {sorted(cols)}.")
        return fmt
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise ValueError(
        f"Cannot tell the sample format from the columns {sorted(cols)}: expected 'messages' (conversations), "
        "'prompt' + 'completion', or 'text'. Rename the columns (datasets' rename_column) or set format=..."
    )


def _render(tokenizer: Any, messages: list, add_generation_prompt: bool = False, **kwargs: Any) -> dict:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so conversations cannot be rendered: use a chat model's tokenizer, "
            "set tokenizer.chat_template, or pass chat_template=... to the data module."
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _marks_generation(tokenizer: Any) -> bool:
    return "{% generation %}" in (getattr(tokenizer, "chat_template", None) or "").replace("{%-", "{%").replace("-%}", "%}")


def _conversation(tokenizer: Any, messages: list, loss_from: int) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` and a 0/1 mask of the assistant tokens of the turns from ``loss_from`` on."""
    full = _render(tokenizer, messages)["input_ids"]
    mask = [0] * len(full)
    if _marks_generation(tokenizer) and loss_from == 0:
        marked = _render(tokenizer, messages, return_assistant_tokens_mask=True)["assistant_masks"]
        return list(full), [int(m) for m in marked]
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i < loss_from:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)["input_ids"] if i else []
        through = _render(tokenizer, messages[: i + 1])["input_ids"]
        if list(through[: len(before)]) != list(before) or list(full[: len(through)]) != list(through):
            raise ValueError(
                "The chat template renders a conversation prefix differently from the start of the whole conversation, "
                "so the assistant's tokens cannot be found by prefix. Use a template that marks them with "
                "{% generation %} ... {% endgeneration %}, or set assistant_only_loss=False."
            )
        for t in range(len(before), len(through)):
            mask[t] = 1
    return list(full), mask


def tokenize_sample(
    sample: Mapping[str, Any], tokenizer: Any, fmt: str, assistant_only_loss: bool = True, completion_only_loss: bool = True
) -> tuple[list[int], list[int]]:
    """One sample -> ``(input_ids, loss_mask)`` (``loss_mask[t] = 1``: token ``t`` is a label of the loss)."""
    eos = tokenizer.eos_token_id
    if fmt == "messages":
        ids, mask = _conversation(tokenizer, list(sample["messages"]), 0)
        return ids, (mask if assistant_only_loss else [1] * len(ids))
    if fmt == "prompt_completion":
        prompt, completion = sample["prompt"], sample["completion"]
        if isinstance(prompt, str):
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            return p + c, ([0] * len(p) if completion_only_loss else [1] * len(p)) + [1] * len(c)
        messages = list(prompt) + list(completion)
        ids, mask = _conversation(tokenizer, messages, len(prompt))
        if not completion_only_loss:
            mask = [1] * len(ids)
        return ids, mask
    if fmt == "text":
        ids = tokenizer(sample["text"])["input_ids"] + ([eos] if eos is not None else [])
        return ids, [1] * len(ids)
    raise ValueError(f"unknown format {fmt!r}; one of {list(FORMATS)}.")


def labels_from_mask(ids: Sequence[int], mask: Sequence[int], ignore_index: int = -100) -> list[int]:
    return [t if m else ignore_index for t, m in zip(ids, mask)]


__all__ = ["FORMATS", "detect_format", "labels_from_mask", "tokenize_sample"]
