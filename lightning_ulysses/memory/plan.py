"""Which memory tricks run: the registry, the strategy's flat flags as an alias, and a Trainer's whole plan.

Registering a trick is one line in :data:`TRICKS` (its class lives in its own module and declares its flat options,
see :class:`~lightning_ulysses.memory.trick.MemoryTrick`); the strategy's flat options, the package root's exports,
the README's table (``tests/test_memory_plan.py`` checks it), the throughput counter and the memory benchmark all
read this list.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_ulysses.memory.activation_checkpoint import GradientCheckpointing
from lightning_ulysses.memory.offload import ActivationOffload
from lightning_ulysses.memory.rmsnorm import MemoryEfficientRMSNorm
from lightning_ulysses.memory.swiglu import MemoryEfficientSwiGLU
from lightning_ulysses.memory.tiled_attention import TiledAttentionBackward
from lightning_ulysses.memory.tiled_loss import TiledLoss
from lightning_ulysses.memory.tiled_mlp import TiledMLP
from lightning_ulysses.memory.trick import MemoryTrick, ordered

# every trick, in plan order
TRICKS: tuple[type[MemoryTrick], ...] = tuple(sorted(
    (GradientCheckpointing, TiledLoss, TiledMLP, MemoryEfficientRMSNorm, MemoryEfficientSwiGLU, TiledAttentionBackward,
     ActivationOffload),
    key=lambda cls: cls.order,
))


@dataclass
class MemoryPlan:
    """The strategy's tricks: ``tricks`` at every layout, ``sp_defaults`` only when sequence parallelism is on
    (checkpointing and the tiled loss are on by default under SP unless a flag or an explicit trick says otherwise)."""

    tricks: list[MemoryTrick] = field(default_factory=list)
    sp_defaults: list[MemoryTrick] = field(default_factory=list)

    def resolve(self, sp_enabled: bool) -> list[MemoryTrick]:
        return ordered(self.tricks + (self.sp_defaults if sp_enabled else []))


def flat_options() -> dict[str, Any]:
    """Every flat option of the registered tricks -> its default: ``None`` (unset) for a switch, the constructor's
    default for a tuning option. The strategy's signature spells the same names and defaults (a test checks)."""
    out: dict[str, Any] = {}
    for kind in TRICKS:
        if kind.flag is None:
            continue
        out[kind.flag] = None
        params = inspect.signature(kind.__init__).parameters
        for name, arg in kind.flag_options.items():
            out[name] = params[arg].default
    return out


def tricks_from_flags(memory: Optional[Sequence[MemoryTrick]] = None, **flags: Any) -> MemoryPlan:
    """The strategy's memory options -> one :class:`MemoryPlan`, one rule for every trick of :data:`TRICKS`.

    * A switch (``tiled_mlp``, ...) ``True`` turns its trick on at every layout, ``False`` keeps it off (SP defaults
      included), ``None`` (unset) leaves it to the rules below.
    * A tuning option given (not at its default: ``tiled_mlp_tile_tokens=8192``) without its switch turns the trick
      on, as if the switch were ``True``; with the switch ``False`` it is an error that names both. An option that
      tunes several tricks (``memory_efficient_impl``) applies to those switched on, and turns on the unset ones
      only when none of them is on.
    * Tricks with ``on_under_sp`` (checkpointing, the tiled loss) are on under sequence parallelism while unset.
    * ``memory``: trick objects with all their options. One given there replaces the flag-built one of its kind;
      a kind given both ways with a non-default flag is an error (which settings win would be a guess).
    """
    defaults = flat_options()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise TypeError(f"unknown memory option(s) {unknown}; the flat options are {sorted(defaults)}.")
    values = {**defaults, **flags}
    switches = {kind.flag: values[kind.flag] for kind in TRICKS if kind.flag}
    for name, value in switches.items():
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None (unset), got {value!r}.")
    given = {name for name in defaults if name not in switches and values[name] != defaults[name]}
    explicit = ordered(memory or [])  # type check, one per kind
    explicit_kinds = {type(t) for t in explicit}
    always: list[MemoryTrick] = []
    sp_defaults: list[MemoryTrick] = []
    for kind in TRICKS:
        if kind.flag is None:
            continue
        switch, tuned = switches[kind.flag], sorted(set(kind.flag_options) & given)
        tuners = {o: [k.flag for k in TRICKS if k.flag and o in k.flag_options] for o in tuned}
        for option, names in tuners.items():
            if all(switches[n] is False for n in names):
                raise ValueError(
                    f"{option}={values[option]!r} tunes {' and '.join(names)}, but "
                    f"{', '.join(f'{n}=False' for n in names)}; drop one of the two."
                )
        turned_on = switch is None and any(all(switches[n] is not True for n in names) for names in tuners.values())
        if kind in explicit_kinds:
            if switch is not None or tuned:
                raise ValueError(
                    f"{kind.__name__} is given in memory=[...] and by the strategy's flat options "
                    f"({', '.join([kind.flag] if switch is not None else tuned)}); use one of the two."
                )
            continue
        if switch is True or turned_on:
            always.append(_build(kind, values))
        elif switch is None and kind.on_under_sp:
            sp_defaults.append(_build(kind, values))
    plan = MemoryPlan(tricks=always + explicit, sp_defaults=sp_defaults)
    for trick in plan.tricks + plan.sp_defaults:
        if trick.needs_flag and switches.get(trick.needs_flag) is False:
            what = trick.needs_flag.replace("_", " ").removeprefix("gradient ")  # gradient_checkpointing -> checkpointing
            raise ValueError(
                f"{type(trick).__name__} ({trick.flag}) builds on {trick.needs_flag}: it needs {what}, but "
                f"{trick.needs_flag}=False; drop one of the two."
            )
    return plan


def _build(kind: type[MemoryTrick], values: dict[str, Any]) -> MemoryTrick:
    """The trick from its flat options; a refused value is reported with the flat names."""
    kwargs = {arg: values[name] for name, arg in kind.flag_options.items()}
    try:
        return kind(**kwargs)
    except (TypeError, ValueError) as exc:
        named = ", ".join(f"{name}={values[name]!r}" for name in kind.flag_options)
        raise ValueError(f"{kind.flag} ({named}): {exc}") from exc


__all__ = ["MemoryPlan", "TRICKS", "flat_options", "tricks_from_flags"]
