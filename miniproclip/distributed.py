"""torchrun setup shared by train.py and the embed CLI: one process group that serves CPU and GPU tensors.

The group is created as "cpu:gloo,cuda:nccl", so a collective on a CPU tensor (a batch size, a flag) goes
through gloo and one on a GPU tensor through NCCL; a plain "nccl" group rejects CPU tensors ("No backend type
associated with device type cpu"). Under torchrun each rank takes the GPU of its LOCAL_RANK, whatever `cuda`
or `cuda:N` was asked for, so eight ranks never pile onto GPU 0. Also the SIGTERM/SIGINT flag of a run
(schedulers preempt with SIGTERM to every rank).
"""

import os
import signal
import sys

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device). Outside torchrun: (0, 1, device) and no process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):  # one GPU per rank, picked by torchrun's LOCAL_RANK
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """End a run that succeeded on every rank: wait for all ranks, then free the process group.

    Without the barrier a rank that is done tears down its gloo/NCCL connections while another is still busy
    with the group, which on gloo can abort a rank at exit ("terminate called without an active exception").
    Call it after the last collective but before rank 0's slow end-of-run writes (curves, stage 0's merged LLM),
    so that no rank waits at the barrier behind them past NCCL's timeout. After an error no rank
    calls it: the barrier would wait for a rank that is gone, so the process exits and torchrun stops the others.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_torchrun_rank() -> None:
    """End a torchrun rank whose work is done and written, skipping the interpreter's teardown (outputs flushed).

    At teardown gloo's worker threads can still hold work objects whose destruction aborts the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch PR 179291), even after `close_distributed`, so
    torchrun would report a run that succeeded as failed. The entry points call this after a multi-rank run; a
    process that is not a torchrun rank (WORLD_SIZE unset or 1) returns and ends as usual.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, save, and exit cleanly (cluster preemption)."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """The handlers from before (the training is over)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
