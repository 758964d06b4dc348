"""Samples -> token ids and a loss mask, for the formats TRL accepts.

* ``messages``: a conversation (``[{"role": ..., "content": ...}, ...]``) rendered with the tokenizer's chat
  template; by default only assistant turns are in the loss (their content and the template's end-of-turn token,
  not the ``assistant`` header nor the whitespace a template prints after the end of turn); a conversation without
  an ``assistant`` turn is refused, naming its roles.
* ``prompt`` / ``completion``: strings (the completion followed by EOS) or conversations (a prompt conversation and
  the completion turns); by default only the completion is in the loss.
* ``text``: plain text followed by EOS, every token in the loss.

Which tokens are the assistant's comes from the template itself: when it marks them (``{% generation %}``),
transformers' ``return_assistant_tokens_mask``; otherwise by rendering each conversation prefix as text and
checking that every rendering is a prefix of the next (a template that rewrites earlier turns cannot be masked
this way and is refused, naming the fix); the characters found map to tokens through the tokenizer's offsets.
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


def _require_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so conversations cannot be rendered: use a chat model's tokenizer, "
            "set tokenizer.chat_template, or pass chat_template=... to the data module."
        )


def _render(tokenizer: Any, messages: list, add_generation_prompt: bool = False, **kwargs: Any) -> dict:
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _marks_generation(tokenizer: Any) -> bool:
    return "{% generation %}" in (getattr(tokenizer, "chat_template", None) or "").replace("{%-", "{%").replace("-%}", "%}")


def _conversation(tokenizer: Any, messages: list, loss_from: int) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` and a 0/1 mask of the assistant tokens of the turns from ``loss_from`` on: each
    turn's content and the template's end-of-turn text, not its header and not what the template prints after the
    end of turn (ChatML's and Gemma's newline)."""
    full = _render(tokenizer, messages)["input_ids"]
    if _marks_generation(tokenizer) and loss_from == 0:
        marked = _render(tokenizer, messages, return_assistant_tokens_mask=True)["assistant_masks"]
        return list(full), [int(m) for m in marked]
    # Without marks: an assistant turn starts where the rendering of the turns before it with the generation prompt
    # (the header) ends, and ends with its content and the first special token after it (the end of turn: ChatML's
    # <|im_end|>, Llama-3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>), or without one, at
    # its last non-space character. Spans are found in characters and mapped to tokens by their offsets, so a
    # tokenizer that merges a header's last characters with the content does not matter.
    text = _render_text(tokenizer, messages)
    specials = _special_strings(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i < loss_from:
            continue
        before = _render_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render_text(tokenizer, messages[: i + 1])
        turn = _assistant_turn(through[len(before):], message.get("content"), specials)
        if not through.startswith(before) or not text.startswith(before + turn):
            raise ValueError(
                "The chat template renders a conversation prefix differently from the start of the whole conversation, "
                "so the assistant's tokens cannot be found by prefix. Use a template that marks them with "
                "{% generation %} ... {% endgeneration %}, or set assistant_only_loss=False."
            )
        spans.append((len(before), len(before) + len(turn)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(full):
        raise ValueError("The tokenizer splits the rendered conversation differently from apply_chat_template; use a "
                         "template that marks the assistant's turns with {% generation %} ... {% endgeneration %}.")
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in encoded["offset_mapping"]]
    return list(full), mask


def _assistant_turn(rendered: str, content: Any, specials: Sequence[str]) -> str:
    """The trained part of an assistant turn rendered after its header: the content, then up to and including the
    first special token (the end of turn), or without one the text up to its last non-space character."""
    at = rendered.rfind(content) if isinstance(content, str) and content else -1
    cut = at + len(content) if at >= 0 else 0  # skip the content itself (it may contain anything)
    tail = rendered[cut:]
    found = [(tail.find(t), -len(t)) for t in specials if t in tail]
    if found:
        start, minus_len = min(found)
        return rendered[: cut + start - minus_len]
    return rendered.rstrip()


def _special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special and added tokens as strings (end-of-turn markers are among them)."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    names |= set((tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}) or {})
    return sorted(n for n in names if n)


def _render_text(tokenizer: Any, messages: list, add_generation_prompt: bool = False) -> str:
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _check_roles(messages: list, loss_from: int) -> None:
    """A conversation whose trained part has no ``assistant`` turn would train on nothing: name the roles it has."""
    roles = [m.get("role") for m in messages[loss_from:]]
    if "assistant" not in roles:
        where = "completion" if loss_from else "conversation"
        raise ValueError(
            f"A {where} has no 'assistant' turn (its roles: {sorted(set(map(str, roles)))}), so assistant-only loss "
            "would train on none of it. Only turns with role 'assistant' are trained on: rename the role (e.g. "
            "'bot'/'gpt'/'model' -> 'assistant'; roles 'system', 'user', 'assistant', 'tool' as chat templates expect), "
            "or set assistant_only_loss=False (completion_only_loss=False) to train on every token."
        )


def tokenize_sample(
    sample: Mapping[str, Any], tokenizer: Any, fmt: str, assistant_only_loss: bool = True, completion_only_loss: bool = True
) -> tuple[list[int], list[int]]:
    """One sample -> ``(input_ids, loss_mask)`` (``loss_mask[t] = 1``: token ``t`` is a label of the loss)."""
    eos = tokenizer.eos_token_id
    if fmt == "messages":
        messages = list(sample["messages"])
        if not assistant_only_loss:
            return _every_token(_render(tokenizer, messages)["input_ids"])
        _check_roles(messages, 0)
        return _conversation(tokenizer, messages, 0)
    if fmt == "prompt_completion":
        prompt, completion = sample["prompt"], sample["completion"]
        if isinstance(prompt, str):
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            return p + c, ([0] * len(p) if completion_only_loss else [1] * len(p)) + [1] * len(c)
        messages = list(prompt) + list(completion)
        if not completion_only_loss:
            return _every_token(_render(tokenizer, messages)["input_ids"])
        _check_roles(messages, len(prompt))
        return _conversation(tokenizer, messages, len(prompt))
    if fmt == "text":
        ids = tokenizer(sample["text"])["input_ids"] + ([eos] if eos is not None else [])
        return ids, [1] * len(ids)
    raise ValueError(f"unknown format {fmt!r}; one of {list(FORMATS)}.")


def _every_token(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    return list(ids), [1] * len(ids)


def labels_from_mask(ids: Sequence[int], mask: Sequence[int], ignore_index: int = -100) -> list[int]:
    return [t if m else ignore_index for t, m in zip(ids, mask)]


__all__ = ["FORMATS", "detect_format", "labels_from_mask", "tokenize_sample"]
