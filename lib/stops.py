"""Stopping a run cleanly on Ctrl-C, SIGTERM or SIGHUP: finish the step, write a checkpoint, say how to go on."""
import os
import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lib import processes


# Ctrl-C; what a cluster sends before it preempts a job; a closed terminal or SSH session (not on Windows)
STOPS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


@contextmanager
def stop_signals(announce=True):
    """Within it, the STOPS signals do not stop the run at once: they are recorded in the list it yields, and the training loop
    finishes its step, writes a checkpoint and exits. A second one stops at once, which is safe too:
    checkpoints are written atomically, so the last one is whole."""
    caught = []

    def handler(signum, frame):
        if caught:
            os.write(2, b"stopped at once; the last checkpoint is whole\n")
            os._exit(128 + signum)
        caught.append(signum)
        if announce:
            os.write(2, f"{signal.Signals(signum).name}: stopping after this step (again to stop at once)\n".encode())

    previous = {sig: signal.signal(sig, handler) for sig in STOPS}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def agreed_stop(caught, world_size, device):
    """The signal to stop on, or 0, the same in every process: a signal reaches torchrun's processes
    at different moments, so they take the largest any of them has caught, once per iteration."""
    if world_size == 1:
        return caught[0] if caught else 0
    flag = torch.tensor(caught[0] if caught else 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def resume_command(script, out_dir, world_size):
    launcher = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
    return f"{launcher} {script} --init_from=resume --out_dir={out_dir}"


def stop_message(it, ckpt_path, script, out_dir, world_size):
    return f"stopped at iteration {it}; checkpoint in {ckpt_path}; resume with: {resume_command(script, out_dir, world_size)}"


def exit_resumable(signum, it, out_dir, script, world_size, master, wandb_run=None):
    """The end of a run stopped by a signal, once its checkpoint is written: say how to go on, wait
    for every process, and exit with the signal's status."""
    if master:
        print(stop_message(it, os.path.join(out_dir, "ckpt.pt"), script, out_dir, world_size), flush=True)
    if world_size > 1:
        dist.barrier()  # no process may exit while the checkpoint is being written
    if wandb_run is not None:  # exit_ddp may end the process before wandb's own exit hook
        wandb_run.finish(exit_code=128 + signum)
    processes.exit_ddp(128 + signum)
