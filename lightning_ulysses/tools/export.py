"""``lightning-ulysses export CHECKPOINT OUT_DIR``: a checkpoint of a ``CausalLMModule`` -> a Hugging Face model
directory that ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads.

``CHECKPOINT`` is what Lightning wrote: a DeepSpeed checkpoint directory (``ModelCheckpoint`` /
``trainer.save_checkpoint`` under ``UlyssesDeepSpeedStrategy``; ZeRO shards are gathered into fp32 by DeepSpeed's
``zero_to_fp32`` through Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``) or a single ``.ckpt`` file.
The model's config comes from the module's saved hyperparameters (the ``model`` it was built from: a hub name,
local path, config dict, or the config of a model instance) unless ``--config`` names one (also the training YAML). Weights are written with ``save_pretrained``
(safetensors, sharded above ``--max-shard-size``), plus the tokenizer when ``--tokenizer`` is given or the model was
built from a path or hub name that has one. A LoRA/PEFT run (``CausalLMModule(peft=...)`` with a dict or a ``PeftConfig``, or
a PEFT model) writes its adapters, or with ``--merge`` the base model with the adapters merged in.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lightning_ulysses.checkpoint.hf_model import write_hf


def load_checkpoint(checkpoint: str) -> dict[str, Any]:
    """The Lightning checkpoint as one dict (``state_dict`` in fp32 for a DeepSpeed directory)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {checkpoint}.")
    if path.is_dir():
        if not (path / "checkpoint").is_dir() and not (path / "latest").exists():
            raise ValueError(
                f"{checkpoint} is a directory but not a DeepSpeed checkpoint (no 'checkpoint/' or 'latest' inside); "
                "pass the directory ModelCheckpoint wrote (e.g. .../checkpoints/epoch=0-step=10.ckpt/)."
            )
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        from lightning_ulysses.checkpoint import verify_checkpoint

        verify_checkpoint(str(path))  # unfinished or truncated: say so, not a torch.load error deep inside

        with tempfile.TemporaryDirectory() as tmp:
            return convert_zero_checkpoint_to_fp32_state_dict(str(path), str(Path(tmp) / "fp32.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=False)


def model_config(spec: Any, trust_remote_code: bool = False) -> Any:
    """A ``PretrainedConfig`` from what the module was built from (a hub name, a local directory, a ``config.json``,
    a config dict) or from a training YAML (``fit --config``'s file: its ``model``'s ``model`` entry)."""
    from lightning_ulysses.models.build import config_of

    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        spec = _model_from_yaml(spec)
    if spec is None:
        raise ValueError(
            "The checkpoint does not say which model it holds (CausalLMModule records it as its 'model' "
            "hyperparameter; checkpoints of a module given a model instance before that was recorded lack it). Pass "
            "--config with a hub name, a local directory, a config.json or the training YAML."
        )
    return config_of(spec, trust_remote_code)


def _model_from_yaml(path: str) -> Any:
    """The ``model`` a LightningCLI YAML gives ``CausalLMModule`` (``model: {model: ...}`` or with ``init_args``)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    section = data.get("model") if isinstance(data, dict) else None
    if isinstance(section, dict) and isinstance(section.get("init_args"), dict):
        section = section["init_args"]
    spec = section.get("model") if isinstance(section, dict) else None
    if spec is None:
        raise ValueError(f"{path} names no model: expected `model: {{model: NAME_OR_CONFIG}}` (or under `init_args`), as "
                         "the YAML given to `lightning-ulysses fit --config` has.")
    return spec


def export_hf(
    checkpoint: str,
    out_dir: str,
    config: Optional[str] = None,
    tokenizer: Optional[str] = None,
    max_shard_size: str = "5GB",
    dtype: Optional[str] = None,
    merge: bool = False,
) -> Path:
    """Write the Hugging Face model of ``checkpoint`` to ``out_dir`` (see the module docstring); returns it.
    A LoRA/PEFT run writes its adapters (``PeftModel.from_pretrained(base, out_dir)``), or with ``merge`` the base
    model with the adapters merged into it."""
    state = load_checkpoint(checkpoint)
    hparams = state.get("hyper_parameters") or {}
    spec = hparams.get("model")
    cfg = model_config(config if config is not None else spec, bool(hparams.get("trust_remote_code")))
    weights = _model_weights(state["state_dict"])
    adapters = hparams.get("peft")
    if adapters is None and any(".lora_" in k for k in weights):
        raise ValueError("The checkpoint holds LoRA weights but not their config (checkpoints written before adapters "
                         "were recorded as the 'peft' hyperparameter lack it). Build the PEFT model from the base model "
                         "and load the checkpoint's weights, or retrain to export it.")
    # where the model came from (a name or directory; an instance's config remembers the directory it was loaded from)
    origin = spec if isinstance(spec, str) else (spec.get("_name_or_path") or None) if isinstance(spec, dict) else None
    return write_hf(weights, cfg, out_dir, adapters=adapters, base=origin, tokenizer=tokenizer or origin,
                    tokenizer_required=tokenizer is not None, max_shard_size=max_shard_size, dtype=dtype, merge=merge)


def _model_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF model's own keys: ``model.*`` (``model_spec.*`` in checkpoints of a module given an instance, which
    registered it under both names before that was fixed)."""
    for prefix in ("model.", "model_spec."):
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            return weights
    raise ValueError("The checkpoint holds no 'model.*' weights: it is not a CausalLMModule checkpoint.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-ulysses export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="DeepSpeed checkpoint directory or .ckpt file written by Lightning")
    parser.add_argument("out_dir", help="directory to write the Hugging Face model to")
    parser.add_argument("--config", help="model config if the checkpoint lacks it: hub name, directory, config.json, or "
                        "the training YAML (its model.model)")
    parser.add_argument("--tokenizer", help="tokenizer to save alongside (hub name or directory)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: fp32)")
    parser.add_argument("--merge", action="store_true", help="LoRA/PEFT runs: write the merged model, not the adapters")
    args = parser.parse_args(argv)
    out = export_hf(args.checkpoint, args.out_dir, args.config, args.tokenizer, args.max_shard_size, args.dtype,
                    args.merge)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
