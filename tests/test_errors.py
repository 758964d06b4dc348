"""Bad input gets a clear error that names the fix, across strategy, data, layout, module and CLI (issue #14).

In-process cases check the message; launched cases check what only a multi-process run shows: a batch that
differs between the ranks of an SP group fails instead of hanging, an error is reported by one rank (not as a
traceback from every rank), and batches with nothing to predict train on with a warning instead of a silent
0.0 or a NaN.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
from lightning_ulysses.parallel.sharding import prepare_batch, prepare_for_sharding
from lightning_ulysses.parallel.layout import ParallelLayout
from tests.harness import WORKERS, worker_env

IDS = torch.ones(1, 8, dtype=torch.long)

STRATEGY_CASES = {
    "loss_normalization": (dict(loss_normalization="tokens"), "loss_normalization must be one of"),
    "timeout_negative": (dict(timeout=-1), "positive number of seconds"),
    "sp_zero": (dict(sequence_parallel_size=0), "positive int or 'auto'"),
    "sp_string": (dict(sequence_parallel_size="two"), "positive int or 'auto'"),
    "mode": (dict(context_parallel_mode="bad"), "context_parallel_mode must be one of"),
    "ring_backend": (dict(ring_attention_backend="bad"), "ring_attention_backend must be one of"),
    "pad_multiple": (dict(pad_to_multiple_of=0), "pad_to_multiple_of must be a positive int"),
    "comm_dtype": (dict(seq_parallel_communication_data_type="int8"), "seq_parallel_communication_data_type"),
    "policy": (dict(checkpoint_policy="bogus"), "bogus"),
    "policy_without_checkpointing": (
        dict(checkpoint_policy="save_attention", gradient_checkpointing=False), "drop one of the two"
    ),
    "keep_layers_without_offload": (
        dict(activation_checkpoint_cpu_offload=False, activation_checkpoint_cpu_offload_keep_layers=2),
        "activation_checkpoint_cpu_offload=False; drop one of the two"
    ),
    "sp_and_cp_disagree": (dict(sequence_parallel_size=2, context_parallel_size=4), "give only one"),
    "attention_tile": (dict(tiled_attention_tile_tokens=0), "tiled_attention_tile_tokens=0): tiled attention tile_tokens must be a positive int"),
}


@pytest.mark.parametrize("name", list(STRATEGY_CASES))
def test_strategy_options_are_checked_with_a_message_that_names_the_fix(name: str) -> None:
    kwargs, message = STRATEGY_CASES[name]
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        UlyssesDeepSpeedStrategy(**kwargs)


DATA_CASES = {
    "text_instead_of_ids": ({"text": ["a long document"]}, "tokenize it first"),
    "input_ids_as_strings": ({"input_ids": ["a long document"]}, "got text"),
    "float_ids": ({"input_ids": torch.ones(1, 8)}, "integer token ids"),
    "one_dimension": ({"input_ids": torch.ones(8, dtype=torch.long)}, "add .unsqueeze(0)"),
    "empty": ({"input_ids": torch.ones(1, 0, dtype=torch.long)}, "empty batch"),
    "not_a_dict": ([IDS], "Return a dict"),
    "left_padding": (
        {"input_ids": IDS, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])}, "padding_side='right'"
    ),
    "labels_shape": ({"input_ids": IDS, "labels": torch.ones(1, 7, dtype=torch.long)}, "must match"),
    "labels_and_shift_labels": ({"input_ids": IDS, "labels": IDS, "shift_labels": IDS}, "not both"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_batches_are_refused_with_a_message_that_names_the_fix(name: str) -> None:
    batch, message = DATA_CASES[name]
    with pytest.raises((ValueError, TypeError, KeyError), match=re.escape(message)):
        prepare_batch(batch, pad_to_multiple_of=2)


def test_layout_and_sharding_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="launch at least 4 processes"):
        ParallelLayout.resolve(4, 2, 4, 4, "sdpa")
    with pytest.raises(ValueError, match=re.escape("Use one of [1, 2, 3, 6]")):
        ParallelLayout.resolve(4, 6, 4, 4, "sdpa")
    with pytest.raises(ValueError, match="this one is not tested under it. Build the model with"):
        ParallelLayout.resolve(2, 2, 4, 4, "kernels-community/vllm-flash-attn3")
    with pytest.raises(ValueError, match="does not support attn_implementation='flex_attention' yet") as err:
        ParallelLayout.resolve(2, 2, 4, 4, "flex_attention")
    assert "block mask" in str(err.value) and "[seq, seq]" not in str(err.value)  # its own reason, not eager's
    with pytest.raises(ValueError, match="must be a multiple of sequence_parallel_size=4"):
        prepare_for_sharding({"input_ids": IDS}, 4, pad_to_multiple_of=6)


def test_module_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="needs a 'model_type' key"):
        CausalLMModule({"hidden_size": 8}).configure_model()
    with pytest.raises(TypeError, match="pass a name/path, dict, config, PreTrainedModel or PEFT model"):
        CausalLMModule(42).configure_model()


TINY = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2}


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, "torch.optim.SGD", {"class_path": "torch.optim.SGD"}],
                         ids=["class", "class_path", "yaml_dict"])
def test_the_optimizer_is_taken_in_every_form_a_user_writes(optimizer) -> None:
    """A class, its class path (a bare torch name too) or the YAML dict (from Python too, as ``peft=`` takes one);
    init_args reach the class; the memory plan still sees which optimizer it is."""
    import functools

    from lightning_ulysses.memory.auto import optimizer_name

    if isinstance(optimizer, dict):
        optimizer = {**optimizer, "init_args": {"lr": 0.25, "momentum": 0.5}}
    elif isinstance(optimizer, type):
        optimizer = functools.partial(optimizer, lr=0.25, momentum=0.5)
    else:
        optimizer = {"class_path": optimizer, "init_args": {"lr": 0.25, "momentum": 0.5}}
    scheduler = {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"total_iters": 4}}
    module = CausalLMModule(TINY, optimizer=optimizer, lr_scheduler=scheduler)
    module.configure_model()
    built = module.configure_optimizers()
    opt = built["optimizer"]
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.25 and opt.defaults["momentum"] == 0.5
    assert type(built["lr_scheduler"]["scheduler"]).__name__ == "LinearLR"
    assert optimizer_name(module.optimizer_factory) == "sgd"
    assert type(CausalLMModule(TINY, optimizer="SGD").optimizer_factory([torch.zeros(1, requires_grad=True)],
                                                                                    lr=0.1)) is torch.optim.SGD


def test_an_optimizer_the_module_cannot_call_is_refused_with_the_forms_it_takes() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(TypeError, match=r"optimizer must be a class or callable .*got a SGD instance"):
        CausalLMModule(TINY, optimizer=torch.optim.SGD([param], lr=0.1))
    with pytest.raises(ValueError, match=r"\['lr'\] belong under 'init_args'"):
        CausalLMModule(TINY, optimizer={"class_path": "torch.optim.SGD", "lr": 0.1})
    with pytest.raises(ValueError, match="optimizer must be .*got a dict with keys \\['lr'\\]"):
        CausalLMModule(TINY, optimizer={"lr": 0.1})
    with pytest.raises(ValueError, match="cannot import 'torch.optim.Sgd'"):
        CausalLMModule(TINY, optimizer="torch.optim.Sgd")
    with pytest.raises(ValueError, match="lr_scheduler: cannot import"):
        CausalLMModule(TINY, lr_scheduler="torch.optim.lr_scheduler.Nope")
    with pytest.raises(ValueError, match="optimizer=None"):
        CausalLMModule(TINY, optimizer=None)


def _launch(mode: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "bad_batches.py"), json.dumps({"mode": mode}), str(tmp_path / "out.json")]
    return subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _rank_tracebacks(output: str) -> int:
    return len(re.findall(r"^\[rank\d+\]: Traceback", output, flags=re.M))


def test_sp_ranks_with_different_batches_fail_once_instead_of_hanging(tmp_path) -> None:
    proc = _launch("rank_dependent", tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "received different batches (token ids differ)" in out and "DistributedSampler" in out, out[-4000:]
    assert _rank_tracebacks(out) == 1, out[-6000:]
    assert "rank 1 stops: rank 0 reports the error" in out


def test_text_batches_are_reported_once_with_how_to_tokenize(tmp_path) -> None:
    proc = _launch("text", tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tokenize it first" in out, out[-4000:]
    assert _rank_tracebacks(out) == 1, out[-6000:]


def test_batches_with_nothing_to_predict_warn_once_count_and_never_divide_by_zero(tmp_path) -> None:
    proc = _launch("nothing_to_predict", tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("has no token to predict") == 1, out[-4000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["empty_batches"] == 2  # all labels ignored; a 1-token sequence
    # (the training sampler shuffles) the two empty batches train at loss 0, the two real ones finite and > 0
    assert sorted(r["losses"])[:2] == [0.0, 0.0]
    assert all(x == x and 0 < x < 10 for x in sorted(r["losses"])[2:]), r["losses"]
