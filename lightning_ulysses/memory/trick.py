"""``MemoryTrick``: one typed object per memory trick, and the one ordered plan that applies them.

A trick is a transformation of a Hugging Face model that trades compute or host memory for GPU memory
(gradient checkpointing, tiled loss, tiled MLP, CPU offload, ...). Each trick is one class, defined in its own
module of this package next to the code it switches on, with:

* its options as constructor arguments, validated there (so a bad YAML value fails when the config is read);
* ``apply(model)`` / ``remove(model)`` on an HF model (idempotent: applying again replaces the settings);
* ``order``: its place in the plan (below);
* ``recomputed_flops(...)``: what it adds to a step's hardware FLOPs (the throughput counter asks every
  registered trick).

The same object is what ``UlyssesDeepSpeedStrategy(memory=[...])`` takes (YAML: ``class_path`` entries), a
Lightning callback for a project without this strategy (``Trainer(callbacks=[TiledMLP()])``: applied at the start
of fit/validate/test/predict), and what the strategy's flat ArcticTraining-style flags
(``tiled_mlp=True``, ...) build (:func:`lightning_ulysses.memory.plan.tricks_from_flags`).

Order. Tricks that change the same modules must be applied in one order whatever order a user lists them in:
checkpointing first (offload and the FLOP count read its policy), then the loss head, the MLP and norm
swaps (the SwiGLU kernel runs inside the tiled MLP's tiles when both are on), the attention kernel, and the
offload last (it hooks the checkpointed stack as configured by the others). :func:`apply_tricks` sorts by
``order`` and refuses two tricks of one kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class MemoryTrick(Callback):
    """Base class of the memory tricks (see the module docstring). Subclasses set ``order`` and, for the strategy's
    flat options (:func:`lightning_ulysses.memory.plan.tricks_from_flags`), ``flag``, ``flag_options`` and
    ``on_under_sp``."""

    order: ClassVar[int] = 100
    # the strategy's flat option that switches it (True / False / None = unset), if it has one
    flag: ClassVar[Optional[str]] = None
    # the strategy's flat options that tune it: flat name -> constructor argument (the flat default is the
    # constructor's); one flat option may tune several tricks (``memory_efficient_impl``)
    flag_options: ClassVar[dict[str, str]] = {}
    # on by default when sequence parallelism is on and its flag is unset
    on_under_sp: ClassVar[bool] = False
    # another trick's flag that must not be False while this trick runs (it builds on that trick)
    needs_flag: ClassVar[Optional[str]] = None

    def apply(self, model: torch.nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, model: torch.nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def recomputed_flops(cls, model: torch.nn.Module, dims: Any, tokens: float, sum_sq_len: float) -> float:
        """FLOPs this trick, as applied to ``model``, recomputes per step beyond the model FLOPs (``dims``,
        ``tokens = sum S``, ``sum_sq_len = sum S^2``: :mod:`lightning_ulysses.models.flops`)."""
        return 0.0

    def options(self) -> dict[str, Any]:
        """The constructor arguments (repr, equality, the README table's option column)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options() == other.options()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    # ---- as a Lightning callback: the whole plan of the Trainer, once per stage start (idempotent)
    def _apply_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ulysses.errors import reported_once
        from lightning_ulysses.models.inspect import find_hf_model

        with reported_once():  # every rank applies the same plan to the same model: one report of a refusal
            model = find_hf_model(pl_module)
            if model is None:
                raise ValueError(
                    f"{type(self).__name__} needs a transformers PreTrainedModel inside the LightningModule; none was "
                    "found."
                )
            apply_tricks(model, trainer_tricks(trainer))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_plan(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_plan(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_plan(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_plan(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # what the stage start applied comes off at its end: the user gets the plain HF model back
        from lightning_ulysses.models.inspect import find_hf_model

        model = find_hf_model(pl_module)
        if model is not None:
            remove_tricks(model, trainer_tricks(trainer))


def ordered(tricks: Iterable[MemoryTrick]) -> list[MemoryTrick]:
    """``tricks`` in plan order; two tricks of one kind is an error (which settings would win is unclear)."""
    tricks = list(tricks)
    seen: dict[type, MemoryTrick] = {}
    for t in tricks:
        if not isinstance(t, MemoryTrick):
            raise TypeError(f"memory tricks must be MemoryTrick objects (lightning_ulysses.memory), got {t!r}.")
        if type(t) in seen and seen[type(t)] != t:
            raise ValueError(
                f"Two {type(t).__name__} tricks with different settings ({seen[type(t)]!r} and {t!r}); keep one."
            )
        seen[type(t)] = t
    return sorted(seen.values(), key=lambda t: t.order)


def apply_tricks(model: torch.nn.Module, tricks: Sequence[MemoryTrick]) -> list[MemoryTrick]:
    """Apply ``tricks`` to the HF ``model`` in plan order; returns them in that order. A PEFT model is given its
    base model's tricks (the adapters live inside it; the wrapper's forward is not a transformers forward)."""
    model = _hf_model(model)
    plan = ordered(tricks)
    for trick in plan:
        trick.apply(model)
    return plan


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    from lightning_ulysses.models.adapters import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def remove_tricks(model: torch.nn.Module, tricks: Sequence[MemoryTrick]) -> None:
    """Undo :func:`apply_tricks` (in reverse plan order; removing what is not applied does nothing). When no trick
    is left on the model, the per-module settings go too."""
    from lightning_ulysses.memory.module_swap import forget_settings, swapped_kind

    model = _hf_model(model)
    for trick in reversed(ordered(tricks)):
        trick.remove(model)
    # no class swapped and no layer checkpointing (HF's per-module flag): nothing reads the settings any more
    if not any(swapped_kind(m) or getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        forget_settings(model)


def trainer_tricks(trainer: Any) -> list[MemoryTrick]:
    """Every trick a Trainer runs, in plan order: its strategy's (``UlyssesDeepSpeedStrategy``), those passed as
    callbacks, and what its LightningModule asks for (``CausalLMModule(gradient_checkpointing=...)``).

    A callback replaces the strategy's trick of its kind (the project's explicit choice). The module's
    ``requested_memory_tricks()`` (kind -> trick, or ``None`` for "off") adds a kind the plan lacks and removes
    one it turns off; a trick left in the plan that builds on a removed one is an error.
    """
    callbacks = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, MemoryTrick)]
    kinds = {type(cb) for cb in callbacks}
    strategy = [t for t in getattr(trainer.strategy, "memory_tricks", None) or [] if type(t) not in kinds]
    plan = {type(t): t for t in ordered(strategy + callbacks)}
    module = getattr(trainer, "lightning_module", None)
    request = module.requested_memory_tricks() if hasattr(module, "requested_memory_tricks") else {}
    for kind, trick in request.items():
        if trick is None:
            plan.pop(kind, None)
            needing = [t for t in plan.values() if t.needs_flag and t.needs_flag == kind.flag]
            if needing:
                raise ValueError(
                    f"The LightningModule turns {kind.__name__} off, but {type(needing[0]).__name__} builds on it; "
                    f"drop one of the two (e.g. CausalLMModule(gradient_checkpointing=None))."
                )
        else:
            plan.setdefault(kind, trick)  # a trick the strategy or a callback set up with its options wins
    return ordered(plan.values())


__all__ = ["MemoryTrick", "apply_tricks", "ordered", "remove_tricks", "trainer_tricks"]
