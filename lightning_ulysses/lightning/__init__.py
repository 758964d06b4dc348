"""The Lightning surface: :class:`~.strategy.UlyssesDeepSpeedStrategy` (orchestrates the other subpackages from
Lightning's hooks), :class:`~.module.CausalLMModule`, the callbacks, the CLI and DeepSpeed-on-CPU support."""
