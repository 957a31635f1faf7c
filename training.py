"""The pieces of a training run, shared by train.py and finetune_alpaca.py: the LR schedule,
AdamW, one optimizer step, evaluation, the processes (DDP, stop signals), checkpoints and resume,
measurements (MFU, memory), and the log with its plot. They are plain functions; each script's
main() strings them together.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import TASKS
from cli import autocast, configure, fail
from data import seed_for
from gpt import (GPT, DownloadError, GPTConfig, apply_lora, atomic_write, load_adapter, quantize_model,
                 read_adapter_config)


# ----------------------------------------------------------------------------- optimization

def lr_at(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup over warmup_iters, then a cosine from learning_rate down to min_lr at
    decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizer(model, learning_rate, weight_decay, betas, device):
    """AdamW over the trainable parameters, decaying the matrices (linear layers, embeddings) but
    not biases and LayerNorm gains. parameters() yields the tied wte/lm_head matrix once."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one pass (on CUDA, and on the CPU: 5x faster there)
    fused = device.startswith("cuda") or device == "cpu"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def make_scaler(device, dtype):
    """float16 gradients underflow without loss scaling; bfloat16 and float32 have float32's range
    and need none (the scaler is then a no-op)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")


def train_step(model, optimizer, scaler, get_batch, it, lr, *, grad_accum=1, rank=0, world_size=1,
               device="cpu", dtype="float32", grad_clip=1.0, seed=0):
    """One optimizer step at learning rate lr over grad_accum micro-batches in this process.
    Process `rank` takes micro-batch indices rank, rank + world_size, ...: the step covers indices
    0 .. world_size * grad_accum - 1 whatever the split into processes. Returns this process's
    mean loss over its micro-batches (a tensor, not synchronized)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        index = micro * world_size + rank
        if world_size > 1:  # reduce the gradients in the last backward pass only; set before the forward
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter them into the shards
                model.set_requires_gradient_sync(micro == grad_accum - 1)
            else:  # DDP: all-reduce them
                model.require_backward_grad_sync = micro == grad_accum - 1
        x, y = get_batch("train", it, index)
        torch.manual_seed(seed_for(seed, "dropout", it, index))  # the dropout masks, like the batch, follow the index
        with autocast(device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss / grad_accum).backward()  # DDP averages over processes, we over micro-batches
        total += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped by the scaler if float16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


def mean_over_ranks(value, world_size):
    """The mean of a scalar tensor over all processes, as a float."""
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return value.item()


@torch.no_grad()
def evaluate(model, get_batch, eval_iters, rank=0, world_size=1, device="cpu", dtype="float32",
             splits=("train", "val")):
    """Mean loss on the fixed batches get_batch(split, "eval", k), k < eval_iters, shared out over the
    processes. Give it the model without its DDP wrapper. Every process runs as many batches (the
    last ones again, uncounted, where eval_iters does not divide): FSDP's forward is collective."""
    model.eval()
    losses = {}
    for split in splits:
        total = torch.zeros((), device=device)
        for k in range(rank, math.ceil(eval_iters / world_size) * world_size, world_size):
            x, y = get_batch(split, "eval", min(k, eval_iters - 1))
            with autocast(device, dtype):
                loss = model(x, y)[1].float()
            if k < eval_iters:
                total += loss
        if world_size > 1:
            dist.all_reduce(total)
        losses[split] = total.item() / eval_iters
    model.train()
    return losses


# ----------------------------------------------------------------------------- processes

@contextmanager
def stop_signals(announce=True):
    """Within it, Ctrl-C (SIGINT) and SIGTERM, which clusters send before they preempt a job, do
    not stop the run at once: they are recorded in the list it yields, and the training loop
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

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
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


def check_fsdp(fsdp, quantize, dtype):
    if fsdp and quantize == "nf4":
        fail("--fsdp=True cannot shard 4-bit NF4 weights: use --quantize=none, or DDP (--fsdp=False) for QLoRA")
    if fsdp and dtype == "float16":
        fail("--fsdp=True with float16 would need a sharded GradScaler: use --dtype=bfloat16 (or float32)")


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


def data_parallel(module, world_size, sharded, device):
    """What the steps run: under DDP the module wrapped to all-reduce the gradients; the module
    itself in one process, or under FSDP, which reduces them by itself."""
    if world_size == 1 or sharded:
        return module
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def split_name(world_size, sharded):
    return "FSDP" if sharded else "DDP" if world_size > 1 else "one process"


def shard_model(model, device, dtype):
    """FSDP (fully_shard, FSDP2): each process keeps 1/world_size of every parameter, its gradient
    and its optimizer state, and gathers a block's whole weights just for that block's forward and
    backward. Each block is one unit, the embeddings, final norm and tied head another (the tied
    matrix stays one parameter). On CUDA with bfloat16 the weights are gathered in bfloat16 and the
    gradients reduced in float32: a MixedPrecisionPolicy does what autocast does elsewhere. Returns
    the dtype to autocast to."""
    policy, autocast_dtype = MixedPrecisionPolicy(), dtype
    if device.startswith("cuda") and dtype == "bfloat16":
        policy, autocast_dtype = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), "float32"
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return autocast_dtype


def held_per_process(model):
    """The line saying what this process holds, in MiB: the weights (parameters and buffers), their
    gradients and AdamW's two moments; whole under DDP, a 1/world_size shard of each under FSDP."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # an FSDP parameter is a DTensor
    def mib(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2 ** 20
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = mib(model.parameters()) + mib(b for _, b in model.named_buffers())
    return (f"per process: weights {weights:,.1f} MiB, gradients {mib(trainable):,.1f} MiB, "
            f"AdamW state {2 * mib(trainable):,.1f} MiB")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """torch.save to a temporary file, fsync, rename: killed at any moment, even by SIGKILL, the
    previous checkpoint stays whole. state holds only tensors and plain Python values."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint as saved above, onto the CPU; weights_only: nothing in it can run code. Mapped,
    not read: under torchrun every process takes the settings from it, rank 0 alone the tensors."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train first, or point --out_dir at the run to resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several kinds, and its advice (weights_only=False) is not to be followed
        ckpt = None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "iter" not in ckpt:
        fail(f"{path} is damaged or not a checkpoint of train.py or finetune_alpaca.py; "
             f"start a new run with another --out_dir")
    return ckpt


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model):
    """The model's state dict, whole, on the CPU of rank 0 (see full_state)."""
    return get_model_state_dict(model, options=FULL)


def full_state(model, optimizer, trainable_only=False):
    """(model, optimizer) state dicts, whole, on the CPU of rank 0 (empty elsewhere), whether the
    run is one process, DDP or FSDP: every process calls it, FSDP's shards are gathered. The
    optimizer's state is keyed by parameter name, so a run split another way can load it.
    trainable_only: the model's trainable parameters alone (a LoRA run's adapters)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_state = get_model_state_dict(model, options=options)
    if trainable_only:  # the frozen embedding's tied twin, lm_head.weight, is not left out by the option
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {name: t for name, t in model_state.items() if name in trainable}
    return model_state, get_optimizer_state_dict(model, optimizer, options=FULL)


def run_state(optimizer_state, scaler, it, best_val_loss, cfg, model, tokenizer, log_path, *, script, world_size,
              evaluated=True):
    """What a checkpoint holds besides the weights: all it takes to go on exactly where it was
    written, on any number of processes. evaluated: whether iteration it's evaluation (if it has
    one) is done; a run stopped by a signal writes its checkpoint before it."""
    return {"optimizer": optimizer_state, "scaler": scaler.state_dict(), "iter": it,
            "best_val_loss": best_val_loss, "config": cfg, "model_args": asdict(model.config),
            "tokenizer": tokenizer, "log_bytes": os.path.getsize(log_path), "script": script,
            "world_size": world_size, "evaluated": evaluated}


def due_for_eval(it, eval_interval, max_iters, ckpt, start_iter):
    """Evaluate (and checkpoint) every eval_interval iterations and at the end, except where the run
    resumes from a checkpoint written after that evaluation."""
    if ckpt is not None and it == start_iter and ckpt.get("evaluated", True):
        return False
    return it % eval_interval == 0 or it == max_iters


def stop_message(it, ckpt_path, script, out_dir, world_size):
    launcher = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
    return (f"stopped at iteration {it}; checkpoint in {ckpt_path}; resume with: "
            f"{launcher} {script} --init_from=resume --out_dir={out_dir}")


def resumed_accumulation(ckpt, accumulation, world_size):
    """gradient_accumulation_steps for a run resuming on world_size processes. A step keeps the
    micro-batches it had (saved world size x saved accumulation), which is what makes the run go
    on as it would have; unless the command line sets another accumulation."""
    saved_world, saved = ckpt.get("world_size", 1), ckpt["config"]["gradient_accumulation_steps"]
    if world_size == saved_world or accumulation != saved:
        return accumulation
    micro = saved_world * saved
    if micro % world_size:
        fits = ", ".join(str(n) for n in range(1, micro + 1) if micro % n == 0)
        fail(f"the checkpoint's steps take {micro} micro-batches ({saved_world} process(es) x {saved}), which "
             f"{world_size} processes cannot share evenly: resume on {fits} process(es)")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"resuming on {world_size} process(es) a run of {saved_world}: gradient_accumulation_steps "
              f"{saved} -> {micro // world_size}, the same {micro} micro-batches per step", flush=True)
    return micro // world_size


def restore_run(ckpt, model, optimizer, scaler, log_path, write_files=True):
    """(start_iter, best_val_loss). A resumed run gets its optimizer and scaler back and its log cut
    back to the checkpoint (lines past it came from steps about to be redone); a fresh run starts a
    fresh log (an out_dir left by a run stopped before its first checkpoint may hold one). model is
    the one the optimizer steps. Under torchrun rank 0 alone reads the weights and the optimizer's
    state and broadcasts them, tensor by tensor; each process keeps what it holds (under FSDP, its
    shard)."""
    if ckpt is None:
        if write_files and os.path.exists(log_path):
            os.remove(log_path)
        return 0, float("inf")
    distributed = dist.is_initialized()
    reads = not distributed or dist.get_rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    if distributed and "model" in ckpt:  # not in a LoRA fine-tune's: every process read its few MB of adapters
        set_model_state_dict(model, ckpt["model"] if reads else {}, options=options)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"] if reads else {}, options=options)
    if ckpt["scaler"]:  # empty when saved without float16
        scaler.load_state_dict(ckpt["scaler"])
    if write_files:
        truncate_log(log_path, ckpt["log_bytes"])
    return ckpt["iter"], ckpt["best_val_loss"]


def run_config(defaults, fixed_keys, argv=None, doc=None, source=None):
    """(cfg, ckpt): the settings from defaults, config files and --key=value, and no checkpoint.
    With --init_from=resume, the checkpoint in out_dir too, and its run's settings become the
    defaults, so the command line changes only what it names; it may not change fixed_keys (the
    model's shape, ...). source is the script's file: its defaults block states the ranges, and
    its name must be the one that wrote the checkpoint."""
    cfg = configure(defaults, argv, doc=doc, source=source)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["init_from"] != "resume":
        if os.path.exists(ckpt_path):  # a forgotten --init_from=resume would write over a run
            fail(f"{ckpt_path} holds a run already: go on with --init_from=resume, or start afresh in "
                 f"another --out_dir (or remove that one)")
        return cfg, None
    ckpt = load_checkpoint(ckpt_path)
    script = os.path.basename(source)
    if ckpt.get("script", script) != script:
        fail(f"{ckpt_path} was written by {ckpt['script']}: resume it with `python {ckpt['script']} "
             f"--init_from=resume --out_dir={cfg['out_dir']}`, or give {script} another --out_dir")
    saved = {k: ckpt["config"].get(k, v) for k, v in defaults.items()}
    cfg = configure(saved, argv, doc=doc, source=source)
    changed = [k for k in fixed_keys if cfg[k] != saved[k]]
    if changed:
        fail(f"{ckpt_path} was trained with {', '.join(f'{k}={saved[k]!r}' for k in changed)}; resuming cannot "
             f"change that to {', '.join(f'{k}={cfg[k]!r}' for k in changed)} (use a new --out_dir)")
    return cfg, ckpt


def check_adapters(cfg):
    """Catch a bad LoRA/QLoRA setting before any weights are downloaded."""
    if cfg["quantize"] not in ("none", "nf4"):
        fail(f"--quantize={cfg['quantize']} is not one of none, nf4")
    if cfg["quantize"] == "nf4" and not cfg["lora_rank"]:
        fail("--quantize=nf4 freezes the weights in 4 bits: it needs --lora_rank > 0 to train anything")


def add_adapters(model, cfg):
    """With lora_rank > 0 only adapters train: the block weights go to NF4 if quantize is "nf4"
    (QLoRA), then LoRA layers wrap them and everything else freezes. A resumed run does the same
    before loading its checkpoint, so that the layers and their names match."""
    rank, quantize = cfg.get("lora_rank", 0), cfg.get("quantize", "none")
    if quantize == "nf4":
        quantize_model(model, cfg.get("double_quant", True))
    if rank:
        torch.manual_seed(cfg["seed"])  # the adapters' random start, the same in every process
        apply_lora(model, rank, cfg["lora_alpha"], cfg["lora_dropout"])
    return model


def model_from_checkpoint(ckpt, cfg=None):
    """The trained model of a checkpoint (with its adapters, if it has any), on the CPU. cfg, when
    given, is a resumed run's settings: its dropout and lora_dropout replace the saved ones. Under
    torchrun only rank 0 reads the weights; restore_run broadcasts them to the others' models."""
    if "model" not in ckpt:  # finetune_alpaca.py keeps a LoRA run's adapters alone
        fail(f"this checkpoint holds LoRA adapters only: load them with --init_from={ckpt['config']['init_from']} "
             f"--adapter=<its out_dir>")
    args, settings = ckpt["model_args"], ckpt["config"]
    if cfg is not None:
        args = {**args, "dropout": cfg["dropout"]}
        settings = {**settings, "lora_dropout": cfg.get("lora_dropout", settings.get("lora_dropout"))}
    model = add_adapters(GPT(GPTConfig(**args)), settings)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.load_state_dict(ckpt["model"])
    return model


def build_model(c, vocab_size, ckpt):
    """The model to train: the checkpoint's, a fresh one, or GPT-2's weights."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, vars(c))
    elif c.init_from == "scratch":
        torch.manual_seed(c.seed)  # the same initial weights in every process
        try:
            model = GPT(GPTConfig(block_size=c.block_size, vocab_size=vocab_size, n_layer=c.n_layer,
                                  n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias,
                                  pos_emb=c.pos_emb, mlp=c.mlp))
        except ValueError as e:
            fail(str(e))
    else:
        try:
            model = GPT.from_pretrained(c.init_from, dropout=c.dropout)
        except (ValueError, FileNotFoundError, DownloadError) as e:
            fail(f"--init_from={c.init_from}: {e}")
    if ckpt is None:
        add_adapters(model, vars(c))
    if vocab_size > model.config.vocab_size:
        fail(f"the dataset's vocabulary ({vocab_size}) is larger than the model's ({model.config.vocab_size})")
    return model


def load_model(cfg):
    """The model to sample from or evaluate, and the name of its tokenizer, from the settings
    init_from (a gpt2* name, a local HF directory, resume: out_dir/ckpt.pt, or "": gpt2 or the
    adapter's base), adapter and tokenizer. On the CPU."""
    if cfg["init_from"] == "resume":  # out_dir/ckpt.pt of a train.py run or of a full fine-tune
        if cfg["adapter"]:
            fail("--adapter goes with a base model (--init_from=gpt2, ...), not with --init_from=resume")
        ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        return model_from_checkpoint(ckpt), ckpt["tokenizer"]
    adapter_error = f"cannot load the adapter in {cfg['adapter']}"
    try:
        base = read_adapter_config(cfg["adapter"])["base_model"] if cfg["adapter"] else "gpt2"
    except (OSError, ValueError) as e:
        fail(f"{adapter_error}: {e}")
    try:
        model = GPT.from_pretrained(cfg["init_from"] or base)
    except (ValueError, FileNotFoundError, DownloadError) as e:
        fail(str(e))
    if cfg["adapter"]:
        try:
            load_adapter(model, cfg["adapter"])
        except (OSError, ValueError) as e:
            fail(f"{adapter_error}: {e}")
    if cfg["init_from"] and cfg["adapter"] and base != cfg["init_from"]:
        print(f"note: the adapter was trained on {base}, it is applied to {cfg['init_from']}", file=sys.stderr)
    return model, cfg["tokenizer"]


# ----------------------------------------------------------------------------- measurements

def flops_per_token(config, n_params, seq_len):
    """Training FLOPs per token (PaLM's appendix B, as nanoGPT counts them): 6 per weight for the
    forward and backward matmuls, plus attention's scores and weighted sums over seq_len."""
    head_size = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_size * seq_len


def matmul_flops(device, dtype, n=None, seconds=0.2):
    """FLOP/s of the fastest n x n matmul in dtype seen in `seconds`: the peak that MFU is judged
    against, measured on the device itself, since no one data-sheet figure fits every GPU (an
    A100's 312e12 puts an H100 above 100%). The fastest, not the mean, so that a busy machine does
    not lower the bar. n: 8192 on a GPU, large enough to keep its tensor cores busy, else 512;
    bench.py calls it with a larger n."""
    n = n or (8192 if device.startswith("cuda") else 512)
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b  # warm-up
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def memory_mb(device):
    """Peak memory so far: the CUDA allocator's on a GPU, else the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource  # POSIX only, hence not at the top
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- logs

def log_record(path, record, wandb_run=None):
    """Append one JSON line to the log (and send the numbers to Weights & Biases)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["iter"])


def log_step(path, record, wandb_run=None):
    """Print a training step's line and log its record: loss, lr, time, tokens/s, MFU (train.py
    only) and peak memory."""
    mfu = f", MFU {100 * record['mfu']:.2f}%" if "mfu" in record else ""
    print(f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['ms']:.1f} ms/iter, "
          f"{record['tokens_per_s']:,.0f} tokens/s{mfu}, mem {record['mem']:,.0f} MB", flush=True)
    log_record(path, record, wandb_run)


def eval_line(it, losses, best_val_loss):
    return f"eval {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (best {best_val_loss:.4f})"


def truncate_log(path, size):
    """Cut the log back to size bytes, its length when the checkpoint was written."""
    if os.path.exists(path) and os.path.getsize(path) > size:
        os.truncate(path, size)


def plot_log(log_path, png_path):
    """Redraw loss, learning rate, throughput and memory from the log into png_path; and, for a run
    with --eval_tasks, the benchmarks' accuracies and perplexities."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure list
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    scores = sorted({k for r in evals for k in r if k.partition("_")[0] in TASKS})
    panels = {"benchmark accuracy": [k for k in scores if k.endswith(("_acc", "_acc_norm"))],
              "benchmark perplexity": [k for k in scores if k.endswith("_ppl")]}
    rows = 3 if scores else 2
    fig = Figure(figsize=(11, 3.5 * rows))
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.24 / rows, top=1 - 0.1 / rows, hspace=0.35, wspace=0.2)
    # one iteration axis for all: the steps are logged every log_interval, the evaluations at the end too
    axes = fig.subplots(rows, 2, sharex=True)
    (ax_loss, ax_lr), (ax_speed, ax_mem) = axes[:2]
    for ax, (title, keys) in zip(axes[2] if scores else (), panels.items()):
        for key in keys:
            ax.plot([r["iter"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o", label=key)
        ax.set(title=title, yscale="log" if title.endswith("perplexity") and keys else "linear")
        if keys:
            ax.legend()
    ax_loss.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)")
    for key, label in (("train_loss", "train (eval)"), ("val_loss", "val")):
        ax_loss.plot([r["iter"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    ax_loss.set(title="loss")
    ax_loss.legend()
    for ax, key, title in ((ax_lr, "lr", "learning rate"), (ax_speed, "tokens_per_s", "tokens/s"),
                           (ax_mem, "mem", "peak memory (MB)")):
        ax.plot([r["iter"] for r in steps], [r[key] for r in steps])
        ax.set(title=title)
    for ax in axes[-1]:
        ax.set(xlabel="iteration")
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=90)
