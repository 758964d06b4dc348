"""The tokenizer of a data module: a name or local path (``AutoTokenizer``), a ``tokenizer.json`` file (the
``tokenizers`` library's format), or a tokenizer object."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_info


def load_tokenizer(tokenizer: Any, chat_template: Optional[str] = None, trust_remote_code: bool = False,
                   eos_token: Optional[str] = None) -> Any:
    """A ``PreTrainedTokenizerBase`` with a pad token (the EOS token when it has none) and, if given, a chat template
    and an EOS token (for a ``tokenizer.json`` that names none)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = tokenizer
    elif isinstance(tokenizer, (str, Path)) and str(tokenizer).endswith(".json") and Path(tokenizer).is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer))
    elif isinstance(tokenizer, (str, Path)):
        tok = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
    else:
        raise TypeError(
            f"tokenizer must be a hub name, a local directory, a tokenizer.json path or a transformers tokenizer; "
            f"got {type(tokenizer).__name__}."
        )
    if chat_template is not None:
        is_file = "{" not in chat_template and len(chat_template) < 4096 and Path(chat_template).is_file()
        tok.chat_template = Path(chat_template).read_text() if is_file else chat_template
    if eos_token is not None:
        if eos_token not in tok.get_vocab():
            raise ValueError(f"eos_token={eos_token!r} is not a token of the tokenizer's vocabulary; name one it has "
                             "(e.g. its end-of-text or end-of-turn token).")
        tok.eos_token = eos_token
    if tok.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no EOS token; samples must end with one. Name it: eos_token='<|endoftext|>' on the data "
            "module (YAML: data.init_args.eos_token), or give a tokenizer directory whose tokenizer_config.json sets it."
        )
    if tok.pad_token_id is None:
        rank_zero_info("lightning_ulysses: the tokenizer has no pad token; padding with the EOS token (labels -100).")
        tok.pad_token = tok.eos_token
    return tok


__all__ = ["load_tokenizer"]
