"""Multi-process worker: a process that ends through ``exit_distributed`` while its gloo groups still have
collectives in flight (as any training leaves them: DeepSpeed and the parameters keep the groups alive) exits 0.

Without it, Python's finalization races the groups' worker threads, which release finished collectives' tensors
and so ask for the GIL; CPython answers with ``pthread_exit`` and the unwinding calls ``std::terminate``
("terminate called without an active exception", exit -6). With 32 all-reduces in flight at exit that happens in
about half of the runs on 2 cores (measured: 3 of 6 twice); with ``exit_distributed`` in none.

``exit_inflight.py CASE_JSON OUT``: CASE_JSON ``{"collectives": n}``. Rank 0 writes OUT from an ``atexit`` handler
(it must still run) and prints a line without a newline (it must still be flushed).
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
import torch.distributed as dist

from lightning_ulysses import exit_distributed

GROUP = None  # a module-level handle, as DeepSpeed and the strategy keep theirs


def main() -> None:
    global GROUP
    case, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    GROUP = dist.new_group(list(range(dist.get_world_size())))
    for _ in range(case["collectives"]):  # nobody waits for these; Python drops the tensors at once
        dist.all_reduce(torch.ones(2_000_000), group=GROUP, async_op=True)
    if int(os.environ["RANK"]) == 0:
        atexit.register(lambda: open(out, "w").write(json.dumps({"atexit": True})))
        print("unflushed tail", end="")
    exit_distributed()


if __name__ == "__main__":
    main()
