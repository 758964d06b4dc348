import os

import pytest
import torch

# DeepSpeed must pick its CPU accelerator before it is first imported (lightning_ulysses sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# what an in-process Trainer leaves in this process: Lightning writes the rendezvous into os.environ and never destroys
# the default process group, whose store keeps listening on MASTER_PORT; a later subprocess test would inherit that
# port through the environment and fail to listen on it (EADDRINUSE)
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
             "GROUP_RANK")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # DeepSpeed caches a clone of the world group (its sequence-data-parallel group without an mpu) on first
        # use; once the group is destroyed, a later in-process fit would broadcast over the dead clone
        import sys

        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None and hasattr(groups, "_WORLD_GROUP"):
            groups._WORLD_GROUP = None
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
