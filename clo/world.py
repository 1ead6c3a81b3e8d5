"""Which process this is, of how many: the one object every script passes around under torchrun.

    torchrun --nproc-per-node 4 train.py ...      # or eval.py, translate.py

`start` joins the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU);
plain `python script.py` gets `World()`, one process, and every method below is then free (no
collective runs). Model sharding (FSDP2) is training's business: clo/train/distributed.py.
"""

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # started by torchrun (even with one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This process's device: CUDA device LOCAL_RANK under torchrun."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, items: list) -> list:
        """This process's contiguous share of a global batch (possibly empty for the last processes)."""
        k = -(-len(items) // self.size)
        return items[self.rank * k : (self.rank + 1) * k]

    def turns(self, n: int) -> range:
        """The tasks of n (batches, chunks) this process takes: rank, rank + N, rank + 2N, ... Dealt in turn,
        the tasks are exactly one process's, so a task's numbers do not depend on N; `merge` joins them."""
        return range(self.rank, n, self.size)

    def merge(self, mine: dict) -> dict:
        """{task: result} of every process joined, on every process (results must pickle)."""
        merged = {}
        for part in self.gather_objects(mine):
            merged.update(part)
        return merged

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (a stop request, say)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj) -> list:
        """Every process's `obj`, in rank order (small things: rows of a table, RNG states)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Process 0's `obj` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def finish(self) -> None:
        """Leave together: wait for every process, then tear the group down while the interpreter is whole.
        A process that finished first and was torn down alone at exit aborted now and then ("terminate
        called without an active exception": translate.py's process 1, 1 run in 8 on a loaded 2-core CPU)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def leave(self) -> None:
        """`finish`, then every process but 0 exits at once, without the interpreter's and C++'s teardown:
        a finished process 1 aborted there now and then even after `finish` ("terminate called without an
        active exception": translate.py, 1 run in 8-14; eval.py's 2-process test, 1 full-suite run in 4;
        loaded 2-core CPU). Process 0 returns, to report and write what is left."""
        self.finish()
        if self.distributed and not self.main:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: torch.device, timeout_s: float = 600) -> World:
    """The process group torchrun asked for (NCCL on CUDA, gloo on CPU), or a one-process World.

    timeout_s bounds how long a collective waits for a process that died or hangs: the job then
    fails instead of hanging (torchrun also stops every process when one exits with an error).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return World()
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        # Torn down before the interpreter exits (a no-op after `finish`): a gloo group left alive can abort a
        # finished process at exit. Not enough on its own: eval.py and translate.py leave through `leave`.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return World(rank, size, local, True)
