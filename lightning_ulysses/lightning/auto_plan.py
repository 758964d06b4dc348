"""``UlyssesDeepSpeedStrategy(memory="auto")``: the facts of a Trainer's run -> :mod:`lightning_ulysses.memory.auto`.

Read before the model is built (the strategy calls :func:`plan_for_trainer` from ``setup_environment``): the model's
config from what the LightningModule was given (``CausalLMModule``'s ``model``: name, directory, config or instance;
any other module: its HF model, if it built one in ``__init__``), the sequence length from the strategy's
``max_seq_len`` or the data module's ``seq_len``, the frozen companions' configs (``frozen_specs``: a reference, a
teacher), rows from its ``batch_size``, the optimizer, LoRA and ZeRO settings,
the GPU's memory (``torch.cuda.mem_get_info``) and the node's available RAM. On CPU the "device" is host memory
shared by the node's ranks.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_ulysses.memory.auto import Estimate, Hardware, choose, host_available_gib, optimizer_name, workload_for_run


def plan_for_trainer(strategy: Any, trainer: Any) -> tuple[Estimate, list[Estimate], str, Optional[str]]:
    """The chosen plan, every estimate, a line that says where the sequence length came from, and the warning to give
    if the rows turn out packed though the plan assumed one sample per row (:func:`packed_rows_warning`)."""
    import torch

    from lightning_ulysses.models.build import config_of

    module = strategy.lightning_module
    config = _model_config(module)
    trust = bool(getattr(module, "trust_remote_code", False))
    frozen = [config_of(spec, trust) for spec in getattr(module, "frozen_specs", [])]
    seq_len, source = _sequence_length(strategy, trainer)
    zero = strategy.config.get("zero_optimization", {}) if isinstance(strategy.config, dict) else {}
    ranks_per_node = max(strategy.num_processes, 1)
    workload = workload_for_run(
        config, seq_len, rows=_data_attribute(trainer, "batch_size") or 1,
        sequence_parallel_size=strategy.sequence_parallel_size, world_size=strategy.world_size,
        ranks_per_node=ranks_per_node, zero_stage=int(zero.get("stage", 0)),
        optimizer=optimizer_name(getattr(module, "optimizer_factory", None)) or "adamw",
        offload_optimizer=_offloaded(zero, "offload_optimizer"), offload_parameters=_offloaded(zero, "offload_param"),
        peft=getattr(module, "peft", None), context_parallel_mode=strategy.context_parallel_mode,
        ulysses_size=strategy.ulysses_size, ring_size=strategy.ring_size, frozen=frozen,
        packed=packs_rows(getattr(trainer, "datamodule", None), module),
        freeze_vision_tower=bool(getattr(module, "freeze_vision_tower", False)),
        freeze_projector=bool(getattr(module, "freeze_projector", False)),
    )
    if strategy.root_device.type == "cuda":
        hardware = Hardware(torch.cuda.mem_get_info(strategy.root_device)[1] / 2**30, host_available_gib())
    else:
        host = host_available_gib()
        hardware = Hardware(host / ranks_per_node, host)
    chosen, estimates = choose(workload, hardware, strategy.memory_user_flags)
    return chosen, estimates, source, packed_rows_warning(chosen, workload, hardware)


def packed_rows_warning(chosen: Estimate, workload: Any, hardware: Hardware) -> Optional[str]:
    """What to tell the user when a batch packs several samples per row but the plan was chosen for one sample per row
    (a plain DataLoader: nothing said it packs) and, counted as packed, the chosen plan would not fit; else None."""
    from dataclasses import replace

    from lightning_ulysses.memory.auto import DEFAULT_MARGIN, estimate

    if workload.packed:
        return None
    packed = estimate(chosen.name, chosen.flags, replace(workload, packed=True), hardware)
    if packed.fits:
        return None
    return (f"memory='auto' chose {chosen.name} for one sample per row (nothing said the rows are packed), but this "
            f"batch packs several samples per row (position ids restart): counted as packed rows the plan's predicted "
            f"GPU peak is {packed.gpu_peak_gib:.1f} GiB, over {DEFAULT_MARGIN:.0%} of {hardware.gpu_memory_gib:.1f} "
            f"GiB, so the step may run out of memory. Load packed data with SFTDataModule / PretrainDataModule / "
            f"PreferenceDataModule (the plan then counts packing), or set gradient_checkpointing=True.")


def _model_config(module: Any) -> Any:
    from lightning_ulysses.models.build import config_of
    from lightning_ulysses.models.inspect import find_hf_model

    spec = getattr(module, "model_spec", None)
    if spec is None:
        spec = find_hf_model(module)
    if spec is None:
        raise ValueError(
            "memory='auto' needs the model's config before the model is built: use CausalLMModule (its `model` "
            "names it), or build the HF model in your LightningModule's __init__; or set the memory options by hand."
        )
    return config_of(spec, bool(getattr(module, "trust_remote_code", False)))


def known_sequence_length(strategy: Any, trainer: Any) -> tuple[Optional[int], str]:
    """Tokens per sequence of the run, where it is known before the first batch: the strategy's ``max_seq_len``,
    else the data module's ``seq_len`` (``None`` otherwise), and where it came from."""
    if strategy.max_seq_len is not None:
        return strategy.max_seq_len, f"max_seq_len={strategy.max_seq_len}"
    seq_len = _data_attribute(trainer, "seq_len")
    return (int(seq_len), f"the data module's seq_len={seq_len}") if seq_len else (None, "")


def _sequence_length(strategy: Any, trainer: Any) -> tuple[int, str]:
    seq_len, source = known_sequence_length(strategy, trainer)
    if seq_len is not None:
        return seq_len, source
    raise ValueError(
        "memory='auto' needs the sequence length to plan for: set the strategy's max_seq_len (YAML: "
        "trainer.strategy.init_args.max_seq_len) or use a data module with a seq_len (SFTDataModule, "
        "PretrainDataModule, SyntheticLMDataModule)."
    )


def packs_rows(datamodule: Any, module: Any = None) -> bool:
    """Whether a run's rows hold several samples: preference pairs always do (chosen + rejected in one row, however
    they are loaded: a ``PreferenceDataModule`` or a ``PreferenceModule``'s batches), the other data modules unless
    their ``packing`` is ``"none"``. Other data (a plain DataLoader) counts as one sample per row."""
    from lightning_ulysses.data.preference import PreferenceDataModule
    from lightning_ulysses.lightning.preference import PreferenceModule

    if isinstance(datamodule, PreferenceDataModule) or isinstance(module, PreferenceModule):
        return True
    packing = getattr(datamodule, "packing", None)
    return packing is not None and packing != "none"


def _data_attribute(trainer: Any, name: str) -> Optional[int]:
    dm = getattr(trainer, "datamodule", None)
    if dm is None:
        return None
    value = getattr(dm, name, None)
    if value is None and hasattr(dm, "hparams"):
        value = dm.hparams.get(name)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _offloaded(zero: dict, key: str) -> bool:
    section = zero.get(key) or {}
    return isinstance(section, dict) and section.get("device") in ("cpu", "nvme")


__all__ = ["known_sequence_length", "packed_rows_warning", "packs_rows", "plan_for_trainer"]
