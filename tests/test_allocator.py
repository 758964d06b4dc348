"""The expandable-segments default never overrides a user's allocator settings."""

from __future__ import annotations

from lightning_ulysses.memory.allocator import set_expandable_segments


def test_sets_default_when_unset(monkeypatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert set_expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_user_setting_wins(monkeypatch) -> None:
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert not set_expandable_segments()
    import os

    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
