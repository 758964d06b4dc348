"""``lightning-ulysses plan --config CONFIG``: every memory plan of a run with its predicted GPU and host peaks, its
speed relative to the fastest, and the longest sequence it allows; the one ``memory: auto`` would choose is marked.

Reads the YAML ``fit`` reads (several ``--config`` merge as in ``fit``): the model (``model.model``), LoRA
(``model.peft``), a preference reference or distillation teacher (their weights), the optimizer, the strategy's layout, ZeRO stage, offload and flat memory options
(:mod:`lightning_ulysses.memory.auto`; user-set options stay in every plan), ``trainer.devices`` / ``num_nodes``, and
the data module's ``seq_len`` / ``batch_size``. Runs without a GPU: ``--gpu-memory-gib`` / ``--host-memory-gib`` give
the machine (default: this one's GPU, and this node's available RAM). Exit 0 when a plan fits, 1 when none does (the
message says by how much and what would fit).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any, Optional, Sequence

GiB = 2**30


def load_yaml(paths: Sequence[str]) -> dict[str, Any]:
    """The configs merged in order (later files win, dicts merged key by key), as ``fit --config A --config B``."""
    import yaml

    merged: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            _merge(merged, yaml.safe_load(f) or {})
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _init_args(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    return section.get("init_args", section) if "class_path" in section or "init_args" in section else section


def run_facts(cfg: dict[str, Any], devices: Optional[int], seq_len: Optional[int]) -> dict[str, Any]:
    """What :func:`lightning_ulysses.memory.auto.workload_for_run` needs, from the YAML."""
    from lightning_ulysses.memory.plan import flat_options

    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    strategy_args = _init_args(strategy) if isinstance(strategy, dict) else {}
    stage = int(strategy_args.get("stage", 3))
    if isinstance(strategy, str) and strategy.startswith("ulysses_stage_"):
        stage = int(strategy.split("_")[2])
    model = _init_args(cfg.get("model"))
    data = _init_args(cfg.get("data"))
    per_node = devices if devices is not None else trainer.get("devices", 1)
    if not isinstance(per_node, int):
        raise ValueError(f"trainer.devices is {per_node!r}; give the number of GPUs per node with --devices N.")
    nodes = int(trainer.get("num_nodes", 1))
    length = seq_len or strategy_args.get("max_seq_len") or data.get("seq_len")
    if not length:
        raise ValueError("The config names no sequence length (data.init_args.seq_len or the strategy's max_seq_len); "
                         "give one with --seq-len S.")
    module_class = _module_class(cfg.get("model"))
    frozen = module_class.frozen_model_specs(model) if hasattr(module_class, "frozen_model_specs") else []
    optimizer = model.get("optimizer", "adamw")
    opt_name = optimizer.get("class_path", "adamw") if isinstance(optimizer, dict) else str(optimizer)
    defaults = flat_options()
    return dict(
        model=model.get("model", model.get("student")), frozen=frozen, peft=model.get("peft"),
        packed=_data_packs(cfg.get("data")) or _is_preference(module_class), trust_remote_code=bool(model.get("trust_remote_code")),
        freeze_vision_tower=bool(model.get("freeze_vision_tower")), freeze_projector=bool(model.get("freeze_projector")),
        seq_len=int(length), rows=int(data.get("batch_size", 1)), world_size=per_node * nodes, ranks_per_node=per_node,
        sequence_parallel_size=strategy_args.get("sequence_parallel_size", strategy_args.get("context_parallel_size", "auto")),
        zero_stage=stage, optimizer=opt_name.rsplit(".", 1)[-1].lower(),
        offload_optimizer=bool(strategy_args.get("offload_optimizer") or strategy == "ulysses_stage_3_offload"),
        offload_parameters=bool(strategy_args.get("offload_parameters") or strategy == "ulysses_stage_3_offload"),
        user_flags={k: v for k, v in strategy_args.items() if k in defaults and v != defaults[k]},
        auto=strategy_args.get("memory") == "auto",
        context_parallel_mode=strategy_args.get("context_parallel_mode", "auto"),
        ulysses_size=strategy_args.get("ulysses_size"), ring_size=strategy_args.get("ring_size"),
    )


def _data_packs(section: Any) -> bool:
    """As :func:`lightning_ulysses.lightning.auto_plan.packs_rows`, from the YAML's ``data`` section."""
    if not isinstance(section, dict):
        return False
    if str(section.get("class_path", "")).endswith("PreferenceDataModule"):
        return True
    packing = _init_args(section).get("packing")
    if packing is None and str(section.get("class_path", "")).endswith(("SFTDataModule", "PretrainDataModule")):
        packing = "best_fit"  # their default
    return packing is not None and packing != "none"


def _is_preference(module_class: Any) -> bool:
    from lightning_ulysses.lightning.preference import PreferenceModule

    return isinstance(module_class, type) and issubclass(module_class, PreferenceModule)


def _module_class(section: Any) -> Any:
    """The LightningModule class a ``model`` section names (``class_path``; default ``CausalLMModule``)."""
    import importlib

    path = section.get("class_path") if isinstance(section, dict) else None
    if not path:
        from lightning_ulysses.lightning.module import CausalLMModule

        return CausalLMModule
    if "." not in path:  # LightningCLI resolves bare class names among the registered subclasses
        import lightning_ulysses

        return getattr(lightning_ulysses, path, None)
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lightning_ulysses.memory.auto import (
        DEFAULT_MARGIN, Hardware, NothingFits, choose, estimate, host_available_gib, longest_sequence, workload_for_run,
    )
    from lightning_ulysses.models.build import config_of

    parser = argparse.ArgumentParser(prog="lightning-ulysses plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="the YAML given to fit (repeatable)")
    parser.add_argument("--devices", type=int, help="GPUs per node (default: trainer.devices)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's)")
    parser.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: this machine's GPU)")
    parser.add_argument("--host-memory-gib", type=float, help="host RAM per node (default: this node's available)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="share of the memory a plan may fill")
    args = parser.parse_args(argv)
    facts = run_facts(load_yaml(args.config), args.devices, args.seq_len)
    gpu = args.gpu_memory_gib
    if gpu is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("No GPU here: give the memory of the GPU to plan for with --gpu-memory-gib G.")
        gpu = torch.cuda.mem_get_info()[1] / GiB
    hw = Hardware(gpu, args.host_memory_gib if args.host_memory_gib is not None else host_available_gib())
    # with `memory: auto` the config's own memory options stay in every plan (as in fit); a config that sets them by
    # hand is shown as one more row, next to the plans auto would choose from
    config_flags, auto = facts.pop("user_flags"), facts.pop("auto")
    user_flags = config_flags if auto else {}
    trust = facts.pop("trust_remote_code")
    config = config_of(facts.pop("model"), trust)
    facts["frozen"] = [config_of(spec, trust) for spec in facts["frozen"]]
    workload = workload_for_run(config, **facts)
    print(f"{workload.seq_len:,} tokens x {workload.rows} row(s), {workload.layers} layers (hidden {workload.hidden}), "
          f"sp={workload.sp} of {workload.world_size} GPUs, ZeRO-{workload.zero_stage}, {workload.optimizer}"
          f"{', LoRA' if workload.trainable_params is not None else ''}"
          f"{f', frozen companions {workload.frozen_params:,} params' if workload.frozen_params else ''}; {hw.gpu_memory_gib:.1f} GiB per GPU, "
          f"{hw.host_memory_gib:.1f} GiB host per node, margin {args.margin:.0%}")
    message = ""
    try:
        chosen, estimates = choose(workload, hw, user_flags, args.margin)
    except NothingFits as exc:
        chosen, estimates, message = None, exc.estimates, str(exc)
    if not auto and config_flags:
        fastest = min(e.step_time for e in estimates)
        mine = estimate("(this config's own options)", config_flags, workload, hw, args.margin)
        estimates = [*estimates, replace(mine, speed=fastest / mine.step_time)]
    print(f"\n{'plan':36s} {'GPU GiB':>8s} {'host GiB':>9s} {'speed':>6s} {'fits':>5s} {'longest seq':>12s}")
    for e in estimates:
        mark = "<- auto" if chosen is not None and e.name == chosen.name else ""
        longest = longest_sequence(e.flags, workload, hw, args.margin)
        print(f"{e.name:36s} {e.gpu_peak_gib:8.1f} {e.host_peak_gib:9.1f} {e.speed:6.2f} {'yes' if e.fits else 'no':>5s} "
              f"{longest:12,d} {mark}")
    if chosen is None:
        print(f"\n{message}")
        return 1
    print(f"\nmemory: auto chooses {chosen.name}: {chosen.flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
