"""Two torchrun "nodes" on localhost (gloo), as a multi-node job starts: layout placement, parity, failures.

``Trainer(num_nodes=2, devices=2)``; each launcher is its own process tree, so Lightning's child-process
observer (which ends a single-node job when one rank dies) does not reach across: a failure must end the job
through the collectives themselves.
"""

from __future__ import annotations

import json

from tests.harness import launch_nodes


def test_two_nodes_keep_ulysses_inside_a_node_and_match_single_process(tmp_path) -> None:
    # sp=4 over 2 nodes x 2 processes, 4 heads: "auto" keeps the Ulysses all-to-all inside a node (ulysses 2)
    # and puts the ring across nodes; with gradient accumulation on top
    case = dict(seq_len=16, lr=0.5, steps=2, sp=4, stage=3, heads=4, kv_heads=2, accumulate=2)
    results, _ = launch_nodes("parity.py", 2, 2, case, tmp_path)
    for rc, out in results:
        assert rc == 0, out[-6000:]
    log = results[0][1]
    assert "2 nodes x 2 processes: every Ulysses group inside one node, ring groups cross nodes" in log, log[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["layout"] == {"sp": 4, "dp": 1, "ring": 2}
    assert max(r["grad_rel_err"].values()) < 1e-5
    for k, losses in enumerate(r["sp_losses"]):
        assert all(abs(x - r["ref_losses"][k][0]) <= 1e-4 for x in losses), (k, losses, r["ref_losses"][k])
    assert all(abs(a - b) <= 1e-4 for a, b in zip(r["logged"], r["ref_step_losses"]))
    assert max(r["param_max_abs_err"].values()) <= 1e-4


def _assert_job_ends(tmp_path, mode: str) -> None:
    # rank 3 (node 1) fails at step 1; the long timeout shows that nothing waits for it to expire
    case = dict(seq_len=16, lr=0.5, steps=4, sp=2, stage=2, heads=4, kv_heads=2, fail_rank=3, fail_step=1,
                fail_mode=mode, timeout=600)
    results, seconds = launch_nodes("parity.py", 2, 2, case, tmp_path, timeout=240)
    codes = [rc for rc, _ in results]
    assert all(rc != 0 for rc in codes), (codes, results[0][1][-3000:])
    assert seconds < 120, f"the job took {seconds:.0f} s to end after a rank failed"
    assert not (tmp_path / "result.json").exists()
    return results


def test_a_rank_that_raises_on_one_node_ends_the_whole_job(tmp_path) -> None:
    results = _assert_job_ends(tmp_path, "raise")
    assert "deliberate failure on rank 3" in results[1][1]


def test_a_rank_killed_on_one_node_ends_the_whole_job(tmp_path) -> None:
    _assert_job_ends(tmp_path, "kill")
