"""Checkpoints (issue #18): ModelCheckpoint mid-epoch, ``fit(ckpt_path=...)`` continues exactly as the uninterrupted
run (same layout: losses and weights bit for bit, AdamW state included), at another layout within fp32 noise
(DeepSpeed's universal checkpoint), and damaged or unfinished checkpoints are refused with an error naming the way out.

Three launched jobs (world 4, 2, 1); the 4-rank job saves the checkpoints the others resume from. 8 samples,
4 batches per epoch at dp=2: step 3 is mid-epoch 0, step 6 mid-epoch 1. Runs at dp=1 use batch 2, the same global
batch, so they see the same samples per step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ulysses.checkpoint import CheckpointError, ResumableLoader, SavedLayout, needs_resharding, read_layout
from lightning_ulysses.checkpoint.files import publish, staging_path, verify_checkpoint, write_manifest
from tests.harness import WORKERS, worker_env

BASE = {"batch_size": 1, "steps": 7, "sp": 2}
# ulysses 2 x ring 2, ZeRO-3, the memory stack, accumulation over 2 batches (the step-3 checkpoint is mid-epoch 1)
STACK = {"sp": 4, "ring_size": 2, "stage": 3, "batch_size": 2, "accumulate": 2, "steps": 5,
         "strategy": {"tiled_loss": True, "tiled_mlp": True, "activation_checkpoint_cpu_offload": True}}


def _job(nproc: int, cases: dict, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / "resume.py"), json.dumps(cases), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"resume job ({nproc} ranks) failed (rc={proc.returncode})\n--- stdout ---\n"
                             f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume")

    def ckpt(run: str, step: int) -> str:
        return str(out / f"{run}_ckpts" / f"step={step}.ckpt")

    _job(4, {
        "ref_z2": dict(BASE, stage=2, save_every=3),
        "same_z2": dict(BASE, stage=2, resume_from=ckpt("ref_z2", 3)),
        "same_z2_epoch1": dict(BASE, stage=2, resume_from=ckpt("ref_z2", 6)),
        "ref_z3": dict(BASE, stage=3, save_every=3),
        "same_z3": dict(BASE, stage=3, resume_from=ckpt("ref_z3", 3)),
        "ref_ring": dict(BASE, stage=1, ring_size=2, save_every=3),
        "same_ring": dict(BASE, stage=1, ring_size=2, resume_from=ckpt("ref_ring", 3)),
        "sp4_z2": dict(BASE, stage=2, sp=4, batch_size=2, resume_from=ckpt("ref_z2", 3)),
        "z3_as_z2": dict(BASE, stage=2, resume_from=ckpt("ref_z3", 3), expect_error=True),
        "ref_z0": dict(BASE, stage=0, save_every=3),
        "ref_hybrid_stack": dict(BASE, **STACK, save_every=3),
        "same_hybrid_stack": dict(BASE, **STACK, resume_from=ckpt("ref_hybrid_stack", 3)),
        "ref_dropout": dict(BASE, stage=2, dropout=0.5, save_every=3),
        "same_dropout": dict(BASE, stage=2, dropout=0.5, resume_from=ckpt("ref_dropout", 3)),
        "ref_sgd": dict(BASE, stage=2, optimizer="sgd", steps=3, save_every=3),
        "ref_sgd_momentum": dict(BASE, stage=2, optimizer="sgd_momentum", steps=4, save_every=3),
        "same_sgd_momentum": dict(BASE, stage=2, optimizer="sgd_momentum", resume_from=ckpt("ref_sgd_momentum", 3),
                                  steps=4),
    }, out)
    damaged = out / "damaged.ckpt"
    shutil.copytree(ckpt("ref_z2", 3), damaged)
    optim = sorted((damaged / "checkpoint").glob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[:100])  # a copy cut short
    _job(2, {
        "world2_z2": dict(BASE, stage=2, batch_size=2, resume_from=ckpt("ref_z2", 3)),
        "world2_z3": dict(BASE, stage=3, batch_size=2, resume_from=ckpt("ref_z3", 3)),
        "world2_z0": dict(BASE, stage=0, batch_size=2, resume_from=ckpt("ref_z0", 3)),  # nothing partitioned
        "damaged": dict(BASE, stage=2, batch_size=2, resume_from=str(damaged), expect_error=True),
    }, out)
    _job(1, {
        "world1_z2": dict(BASE, stage=2, sp=1, batch_size=2, resume_from=ckpt("ref_z2", 3)),
        # optimizers without Adam's moments: DeepSpeed's universal converter cannot carry them; refused up front
        "world1_sgd": dict(BASE, stage=2, sp=1, batch_size=2, optimizer="sgd", resume_from=ckpt("ref_sgd", 3),
                           expect_error=True),
        "world1_sgd_momentum": dict(BASE, stage=2, sp=1, batch_size=2, optimizer="sgd_momentum",
                                    resume_from=ckpt("ref_sgd_momentum", 3), expect_error=True),
    }, out)
    return out


def _result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _compare(out: Path, ref: str, resumed: str, atol: float) -> None:
    a, b = _result(out, ref), _result(out, resumed)
    last = max(map(int, a["losses"]))
    assert sorted(map(int, b["losses"])) == list(range(int(min(b["losses"], key=int)), last + 1))  # every step after
    for step, loss in b["losses"].items():
        assert abs(loss - a["losses"][step]) <= atol, (step, loss, a["losses"][step])
        assert b["samples"][step] == a["samples"][step]  # the next batch is the one the uninterrupted run read
    wa, wb = torch.load(out / f"{ref}.pt"), torch.load(out / f"{resumed}.pt")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("ref, resumed, first", [
    ("ref_z2", "same_z2", 4), ("ref_z2", "same_z2_epoch1", 7), ("ref_z3", "same_z3", 4), ("ref_ring", "same_ring", 4),
    ("ref_hybrid_stack", "same_hybrid_stack", 4), ("ref_dropout", "same_dropout", 4),  # each rank's RNG state is in the checkpoint: the same dropout masks
])
def test_resume_mid_epoch_continues_bit_for_bit(runs, ref, resumed, first) -> None:
    assert min(map(int, _result(runs, resumed)["losses"])) == first
    _compare(runs, ref, resumed, atol=0.0)


@pytest.mark.parametrize("ref, resumed", [
    ("ref_z2", "sp4_z2"),  # sp=2 x dp=2 -> sp=4 on the same 4 ranks
    ("ref_z2", "world2_z2"), ("ref_z3", "world2_z3"),  # 4 -> 2 ranks (universal checkpoint)
    ("ref_z0", "world2_z0"),  # ZeRO-0: DeepSpeed's own files load at any world size
    ("ref_z2", "world1_z2"),  # 4 ranks -> one process
])
def test_resume_at_another_layout_continues_within_fp32_noise(runs, ref, resumed) -> None:
    _compare(runs, ref, resumed, atol=1e-5)


def test_saves_are_complete_and_listed(runs) -> None:
    ckpts = runs / "ref_z2_ckpts"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=3.ckpt", "step=6.ckpt"]  # no .partial left behind
    manifest = json.loads((ckpts / "step=3.ckpt" / "ulysses_checkpoint.json").read_text())
    assert manifest["layout"] == {"world_size": 4, "zero_stage": 2, "sequence_parallel_size": 2,
                                  "optimizer_partitions": 4, "optimizer": "AdamW", "optimizer_state": ["exp_avg", "exp_avg_sq"]}
    assert read_layout(str(ckpts / "step=3.ckpt")) == SavedLayout(4, 2, 2, 4, "AdamW", ["exp_avg", "exp_avg_sq"])
    assert sum(1 for f in manifest["files"] if f.endswith("optim_states.pt")) == 4


def test_refusals_name_the_way_out(runs) -> None:
    assert "ZeRO-3 and ZeRO-1/2" in _result(runs, "z3_as_z2")["error"]
    for name, held in (("world1_sgd", "keeps no per-parameter state"), ("world1_sgd_momentum", "keeps ['momentum_buffer']")):
        error = _result(runs, name)["error"]  # the real reason (not disk space) and the two ways out
        assert f"with SGD, which {held}" in error and "only Adam's moments" in error, error
        assert "Resume at world size 4" in error and "lightning-ulysses export" in error, error
        assert "disk" not in error, error
    damaged = _result(runs, "damaged")["error"]
    assert "damaged" in damaged and "bytes" in damaged and "earlier checkpoint" in damaged


def test_sgd_with_momentum_resumes_at_the_saved_world_size(runs) -> None:
    assert min(map(int, _result(runs, "same_sgd_momentum")["losses"])) == 4  # momentum buffers restored as saved
    _compare(runs, "ref_sgd_momentum", "same_sgd_momentum", atol=0.0)


def test_an_unconvertible_optimizer_is_refused_before_conversion() -> None:
    saved = SavedLayout(2, 2, 2, 2, "SGD", [])
    with pytest.raises(CheckpointError, match="with SGD, which keeps no per-parameter state; this run has world size 1"):
        needs_resharding(saved, SavedLayout(1, 2, 1))
    assert not needs_resharding(saved, SavedLayout(2, 2, 1))  # same world size: loads as saved, any SP degree
    assert needs_resharding(SavedLayout(2, 2, 2, 2, "AdamW", ["exp_avg", "exp_avg_sq"]), SavedLayout(1, 2, 1))
    assert needs_resharding(SavedLayout(2, 2, 2, 2), SavedLayout(1, 2, 1))  # not recorded: the converter decides


def test_unfinished_and_damaged_checkpoints_are_refused(tmp_path) -> None:
    path = tmp_path / "step=3.ckpt"
    staging = Path(staging_path(str(path)))
    (staging / "checkpoint").mkdir(parents=True)
    (staging / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="did not finish"):  # the save crashed before the rename
        verify_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="did not finish"):
        verify_checkpoint(str(staging))
    write_manifest(str(staging), SavedLayout(2, 2, 2))
    publish(str(staging), str(path))
    verify_checkpoint(str(path))
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 3)
    with pytest.raises(CheckpointError, match="has 3 bytes, 10 were written"):
        verify_checkpoint(str(path))


def test_which_layout_changes_need_resharding() -> None:
    assert not needs_resharding(SavedLayout(4, 2, 2), SavedLayout(4, 2, 4))  # SP degree: same files
    assert needs_resharding(SavedLayout(4, 2, 2), SavedLayout(2, 1, 2))  # ZeRO-1/2 read each other's
    assert not needs_resharding(SavedLayout(4, 0), SavedLayout(1, 0))
    with pytest.raises(CheckpointError, match="ZeRO-0"):
        needs_resharding(SavedLayout(4, 0), SavedLayout(4, 2))
    # ZeRO-0 with DeepSpeed's bf16 optimizer (GPU) keeps per-rank optimizer partitions: same world size only
    assert not needs_resharding(SavedLayout(4, 0, 2, optimizer_partitions=4), SavedLayout(4, 0, 4))
    with pytest.raises(CheckpointError, match="bf16 optimizer"):
        needs_resharding(SavedLayout(4, 0, 2, optimizer_partitions=4), SavedLayout(2, 0, 2))


def test_resumable_loader_skips_the_samples_read_at_any_global_batch() -> None:
    from torch.utils.data import DataLoader

    position = {"epoch": 0, "batches": 3}
    loader = ResumableLoader(DataLoader(list(range(16)), batch_size=2), lambda: (position["epoch"], position["batches"]), 2)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3, "global_batch": 4, "replicas": 2}  # 12 samples read over 2 replicas
    resumed = ResumableLoader(DataLoader(list(range(16)), batch_size=4), lambda: (0, 0), 1)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[12, 13, 14, 15]]
    assert [b.tolist() for b in resumed][0] == [0, 1, 2, 3]  # the next epoch starts at its beginning
    odd = ResumableLoader(DataLoader(list(range(16)), batch_size=5), lambda: (0, 0), 1)
    odd.load_state_dict(state)
    with pytest.raises(CheckpointError, match="does not divide"):
        iter(odd)
