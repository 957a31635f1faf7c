"""The processes of a run: torchrun's process group (DDP), sharding (FSDP), and what each process holds."""
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lib.cli import fail


def setup_ddp(device):
    """Join the process group when started by torchrun (nccl for GPUs, gloo otherwise); each
    process takes the GPU of its local rank. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def exit_ddp(status=0):
    """The end of a script: leave the process group and, under torchrun, end the process at once
    with this exit status. Its files are written and closed by then; the interpreter's shutdown is
    skipped because FSDP's DTensor caches keep the group and gloo's worker threads alive to the
    end, and a worker still freeing a finished collective's tensors as the interpreter shuts down
    waits for a GIL it can no longer have and aborts the process (SIGABRT, a run in a few dozen
    under load). One process returns as usual (raising SystemExit for a non-zero status)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        raise SystemExit(status)


def check_fsdp(fsdp, quantize, dtype, world_size, resuming):
    """--fsdp=True where it cannot work, or would do nothing. A run written under FSDP may resume
    on one process, which then holds the whole model."""
    if fsdp and quantize == "nf4":
        fail("--fsdp=True cannot shard 4-bit NF4 weights: use --quantize=none, or DDP (--fsdp=False) for QLoRA")
    if fsdp and dtype == "float16":
        fail("--fsdp=True with float16 would need a sharded GradScaler: use --dtype=bfloat16 (or float32)")
    if fsdp and world_size == 1 and not resuming:
        fail("--fsdp=True shards the model over the processes that torchrun starts, and there is one: start with "
             "torchrun --standalone --nproc_per_node=N, or leave --fsdp out")


@contextmanager
def rank_zero_first():
    """The first process of each node runs what is inside first (downloads into the node's cache),
    then the node's other processes, which find the files there. A failure inside still lets the
    others go on, to fail the same way with the same one line."""
    others_wait = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) != 0
    if others_wait:
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and not others_wait:
            dist.barrier()


def data_parallel(module, world_size, sharded, device):
    """What the steps run: under DDP the module wrapped to all-reduce the gradients; the module
    itself in one process, or under FSDP, which reduces them by itself."""
    if world_size == 1 or sharded:
        return module
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def shard_model(model, device, dtype):
    """FSDP (fully_shard, FSDP2): each process keeps 1/world_size of every parameter, its gradient
    and its optimizer state, and gathers a block's whole weights just for that block's forward and
    backward. Each block is one unit, the embeddings, final norm and tied head another (the tied
    matrix stays one parameter). On CUDA with bfloat16 the weights are gathered in bfloat16 and the
    gradients reduced in float32: a MixedPrecisionPolicy does what autocast does elsewhere. Returns
    the dtype to autocast to."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # here: a 0.5 s import only FSDP runs need
    policy, autocast_dtype = MixedPrecisionPolicy(), dtype
    if device.startswith("cuda") and dtype == "bfloat16":
        policy, autocast_dtype = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), "float32"
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return autocast_dtype


@contextmanager
def gathered(model, sharded):
    """Generation runs past forward(), whose hooks gather an FSDP model's weights: gather the
    top-level unit (embeddings, final norm, head) by hand; the blocks gather their own."""
    if sharded:
        model.unshard()
    try:
        yield model
    finally:
        if sharded:
            model.reshard()


def split_name(world_size, sharded):
    return "FSDP" if sharded else "DDP" if world_size > 1 else "one process"


def held_per_process(model, optimizer=None):
    """The line saying what this process holds, in MiB: the weights (parameters and buffers), their
    gradients and the optimizer's state, AdamW's two moments per trainable weight (Muon's one
    momentum buffer per matrix it owns, given a training.MuonAdamW); whole under DDP, a
    1/world_size shard of each under FSDP."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # an FSDP parameter is a DTensor
    def mib(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2 ** 20
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = mib(model.parameters()) + mib(b for _, b in model.named_buffers())
    pair = isinstance(optimizer, tuple)  # a MuonAdamW, Muon first; never torch.optim.Muon by name, absent before 2.9
    muon = [p for group in optimizer[0].param_groups for p in group["params"]] if pair else []
    names = " and ".join(type(opt).__name__ for opt in optimizer) if pair else "AdamW"
    return (f"per process: weights {weights:,.1f} MiB, gradients {mib(trainable):,.1f} MiB, "
            f"{names} state {2 * mib(trainable) - mib(muon):,.1f} MiB")


def mean_over_ranks(value, world_size):
    """The mean of a scalar tensor over all processes, as a float."""
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return value.item()
