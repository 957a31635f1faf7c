"""Train a GPT from scratch, from GPT-2's weights, or on from where a run stopped.

    python train.py --dataset=tinystories --batch_size=8
    python train.py config/tinystories.py --max_iters=2000 --compile=False
    torchrun --standalone --nproc_per_node=2 train.py config/tinystories.py
    python train.py --init_from=resume --out_dir=out-tinystories
    python train.py --init_from=gpt2 --dataset=shakespeare --learning_rate=3e-5
    python train.py --init_from=gpt2 --dataset=wikitext2 --lora_rank=8 --quantize=nf4   # QLoRA

Settings: the defaults below, then config files given as bare arguments, then --key=value.
The pieces (batches, LR schedule, AdamW, DDP, one optimizer step, evaluation, checkpoints, the log
and its plot) are plain functions that finetune_alpaca.py imports too; main() at the bottom
strings them together.

A batch is a pure function of (seed, iteration, micro-batch index), and so is the dropout noise:
one process accumulating G micro-batches and G processes taking one each compute the same step,
and a resumed run repeats an uninterrupted one bit for bit, with no random state to carry over.
"""
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import autocast, configure, fail, pick_device, pick_dtype, run, writable_dir
from gpt import GPT, DownloadError, GPTConfig, apply_lora, atomic_write, get_tokenizer, quantize_model
from prepare_data import DATASETS, read_tokens

# ----------------------------------------------------------------------------- defaults
# I/O
out_dir = "out"
eval_interval = 250       # >= 1; evaluate, sample, plot and checkpoint every this many iterations
eval_iters = 50           # >= 1; batches per split in an evaluation, spread over the processes
log_interval = 10         # >= 1
init_from = "scratch"     # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF directory
sample_prompt = ""        # the fixed prompt sampled from at each evaluation; empty: <|endoftext|>
sample_tokens = 48        # >= 0; 0: no sample
wandb_log = False
wandb_project = "gpt2ref"
wandb_run_name = "train"
# data: data_dir/dataset/{train,val}.bin and meta.json, from prepare_data.py
dataset = "tinystories"
data_dir = "data"
batch_size = 8            # >= 1
block_size = 256          # >= 1
gradient_accumulation_steps = 1  # >= 1; per process: a step sees world_size * this * batch_size sequences
# model (ignored for gpt2* weights, which bring their own shape)
n_layer = 6               # >= 1
n_head = 6                # >= 1
n_embd = 384              # >= 1; a multiple of n_head
dropout = 0.0             # [0, 1)
bias = True
pos_emb = "learned"       # learned | rope
mlp = "gelu"              # gelu | swiglu
# parameter-efficient training: LoRA adapters on frozen weights (gpt.py's lora and nf4 sections)
lora_rank = 0             # >= 0; 0: train every weight
lora_alpha = 16.0         # > 0; the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.05       # [0, 1)
quantize = "none"         # none | nf4: the frozen block weights in 4 bits, QLoRA (needs lora_rank > 0)
# AdamW and the learning-rate schedule
learning_rate = 6e-4      # > 0
max_iters = 5000          # >= 0
weight_decay = 0.1        # >= 0
beta1 = 0.9               # [0, 1)
beta2 = 0.95              # [0, 1)
grad_clip = 1.0           # >= 0; 0: no clipping
warmup_iters = 100        # >= 0
lr_decay_iters = 0        # >= 0; cosine decay to min_lr ends here; 0: at max_iters
min_lr = 6e-5             # >= 0
# system
device = "auto"           # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"            # auto | float32 | bfloat16 | float16 (float16 adds a GradScaler)
compile = False           # torch.compile the model
seed = 1337               # [0, 2**63)
peak_flops = 0.0          # >= 0; FLOP/s that MFU is against; 0: A100 bf16 (312e12) on CUDA, a measured matmul elsewhere
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos_emb", "mlp",  # fixed once a run starts
              "lora_rank", "lora_alpha", "quantize")


# ----------------------------------------------------------------------------- batches

def seed_for(*key):
    """A 63-bit seed from any key like (seed, "train", iteration, index); the same in every process
    and every Python (unlike hash(), which is salted for strings)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_loader(folder, batch_size, block_size, device, seed):
    """get_batch(split, key, index) -> (x, y), each (batch_size, block_size): windows of the split's
    tokens at offsets drawn from a generator seeded by (seed, split, key, index). key is the
    iteration for training batches and "eval" for the fixed evaluation batches."""
    def get_batch(split, key, index):
        # opened per batch, as nanoGPT does: a long-lived memmap lets touched pages pile up in RSS
        tokens = read_tokens(os.path.join(folder, f"{split}.bin"))
        gen = torch.Generator().manual_seed(seed_for(seed, split, key, index))
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=gen).tolist()
        rows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if device.startswith("cuda"):  # page-locked memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
    return get_batch


def read_meta(folder, block_size):
    """meta.json of a prepared dataset, after checking it and that both shards are there and long enough."""
    path = os.path.join(folder, "meta.json")
    name = os.path.basename(folder)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        how = (f"python prepare_data.py {name}" if name in DATASETS else
               f"python prepare_data.py text --input=your.txt --out_dir={folder}")
        fail(f"no dataset in {folder} (meta.json is missing): prepare one with `{how}` or point "
             f"--data_dir/--dataset at it")
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}; prepare the dataset again with prepare_data.py")
    vocab_size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str):
        fail(f"{path} names no tokenizer: prepare the dataset again with prepare_data.py")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        fail(f"{path}: vocab_size must be a positive int, got {vocab_size!r}; prepare the dataset again")
    for split in ("train", "val"):
        try:
            count = len(read_tokens(os.path.join(folder, f"{split}.bin")))
        except (OSError, ValueError) as e:
            fail(f"{split} split of {folder}: {e}")
        if count <= block_size:
            fail(f"the {split} split of {folder} has {count} tokens: too few for --block_size={block_size}")
    return meta


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
    # the fused kernel updates every tensor in one pass (CUDA; CPU since torch 2.4, 5x faster there)
    torch_version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    fused = device.startswith("cuda") or (device == "cpu" and torch_version >= (2, 4))
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def make_scaler(device, dtype):
    """float16 gradients underflow without loss scaling; bfloat16 and float32 have float32's range
    and need none (the scaler is then a no-op)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")


def train_step(model, optimizer, scaler, get_batch, it, lr, grad_accum=1, rank=0, world_size=1,
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
        if world_size > 1:  # all-reduce the gradients in the last backward pass only; set before the forward
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
    processes. Give it the model without its DDP wrapper: the processes may run unequal counts."""
    model.eval()
    losses = {}
    for split in splits:
        total = torch.zeros((), device=device)
        for k in range(rank, eval_iters, world_size):
            x, y = get_batch(split, "eval", k)
            with autocast(device, dtype):
                total += model(x, y)[1].float()
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


def teardown_ddp():
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """torch.save to a temporary file, fsync, rename: killed at any moment, even by SIGKILL, the
    previous checkpoint stays whole. state holds only tensors and plain Python values."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint as saved above, onto the CPU; weights_only: nothing in it can run code."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train first, or point --out_dir at the run to resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several kinds, and its advice (weights_only=False) is not to be followed
        ckpt = None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "iter" not in ckpt:
        fail(f"{path} is damaged or not a checkpoint of train.py or finetune_alpaca.py; "
             f"start a new run with another --out_dir")
    return ckpt


def run_state(optimizer, scaler, it, best_val_loss, cfg, model, tokenizer, log_path, *, script, evaluated=True):
    """What a checkpoint holds besides the weights: all it takes to go on exactly where it was
    written. evaluated: whether iteration it's evaluation (if it has one) is done; a run stopped by
    a signal writes its checkpoint before it."""
    return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter": it,
            "best_val_loss": best_val_loss, "config": cfg, "model_args": asdict(model.config),
            "tokenizer": tokenizer, "log_bytes": os.path.getsize(log_path), "script": script,
            "evaluated": evaluated}


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


def restore_run(ckpt, optimizer, scaler, log_path, write_files=True):
    """(start_iter, best_val_loss). A resumed run gets its optimizer and scaler back and its log cut
    back to the checkpoint (lines past it came from steps about to be redone); a fresh run in an
    old out_dir starts a fresh log."""
    if ckpt is None:
        if write_files and os.path.exists(log_path):
            os.remove(log_path)
        return 0, float("inf")
    optimizer.load_state_dict(ckpt["optimizer"])
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
    if cfg["init_from"] != "resume":
        return cfg, None
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
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


def model_from_checkpoint(ckpt):
    """The trained model of a checkpoint (with its adapters, if it has any), on the CPU."""
    if "model" not in ckpt:  # finetune_alpaca.py keeps a LoRA run's adapters alone
        fail(f"this checkpoint holds LoRA adapters only: load them with --init_from={ckpt['config']['init_from']} "
             f"--adapter=<its out_dir>")
    model = add_adapters(GPT(GPTConfig(**ckpt["model_args"])), ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------- measurements

def flops_per_token(config, n_params, seq_len):
    """Training FLOPs per token (PaLM's appendix B, as nanoGPT counts them): 6 per weight for the
    forward and backward matmuls, plus attention's scores and weighted sums over seq_len."""
    head_size = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_size * seq_len


def matmul_flops(device, dtype, n=512, seconds=0.2):
    """FLOP/s of the fastest n x n matmul in dtype seen in `seconds`: the peak that MFU is judged
    against where there is no data-sheet figure (CPU, MPS). The fastest, not the mean, so that a
    busy machine does not lower the bar. bench.py calls it with a larger n."""
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


def truncate_log(path, size):
    """Cut the log back to size bytes, its length when the checkpoint was written."""
    if os.path.exists(path) and os.path.getsize(path) > size:
        os.truncate(path, size)


def plot_log(log_path, png_path):
    """Redraw loss, learning rate, throughput and memory from the log into png_path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure list
    records = [json.loads(line) for line in open(log_path)]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(11, 7))
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.08, top=0.95, hspace=0.35, wspace=0.2)
    (ax_loss, ax_lr), (ax_speed, ax_mem) = fig.subplots(2, 2)
    ax_loss.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)")
    for key, label in (("train_loss", "train (eval)"), ("val_loss", "val")):
        ax_loss.plot([r["iter"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="iteration")
    ax_loss.legend()
    for ax, key, title in ((ax_lr, "lr", "learning rate"), (ax_speed, "tokens_per_s", "tokens/s"),
                           (ax_mem, "mem", "peak memory (MB)")):
        ax.plot([r["iter"] for r in steps], [r[key] for r in steps])
        ax.set(title=title, xlabel="iteration")
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=90)


# ----------------------------------------------------------------------------- the run

def set_dropout(model, p):
    """Dropout of a built GPT: GPT-2's weights come without, and a resumed run may change it."""
    model.config.dropout = model.transformer.drop.p = p
    for block in model.transformer.h:  # attention's own is an argument of the SDPA kernel
        block.attn.dropout = block.attn.resid_dropout.p = block.mlp.dropout.p = p


def build_model(c, vocab_size, ckpt):
    """The model to train: the checkpoint's, a fresh one, or GPT-2's weights."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
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
            model = GPT.from_pretrained(c.init_from)
        except (ValueError, FileNotFoundError, DownloadError) as e:
            fail(f"--init_from={c.init_from}: {e}")
    set_dropout(model, c.dropout)
    if ckpt is None:
        add_adapters(model, vars(c))
    if vocab_size > model.config.vocab_size:
        fail(f"the dataset's vocabulary ({vocab_size}) is larger than the model's ({model.config.vocab_size})")
    return model


def main(argv=None):
    cfg, ckpt = run_config(DEFAULTS, MODEL_KEYS, argv, __doc__, __file__)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    c = SimpleNamespace(**cfg)
    check_adapters(cfg)
    writable_dir(c.out_dir)

    rank, world_size, device = setup_ddp(pick_device(c.device))
    master = rank == 0  # only the first process writes files and prints
    dtype = pick_dtype(c.dtype, device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    folder = os.path.join(c.data_dir, c.dataset)
    meta = read_meta(folder, c.block_size)
    get_batch = batch_loader(folder, c.batch_size, c.block_size, device, c.seed)
    try:
        enc = get_tokenizer(meta["tokenizer"])
    except (ValueError, DownloadError) as e:
        fail(str(e))
    prompt = enc.encode(c.sample_prompt, allowed_special={"<|endoftext|>"}) if c.sample_prompt else [enc.eot_token]

    model = build_model(c, meta["vocab_size"], ckpt).to(device)
    if c.block_size > model.config.block_size:
        fail(f"--block_size={c.block_size} is longer than the model's context of {model.config.block_size}")
    vocab = model.config.vocab_size
    if c.sample_tokens and max(prompt) >= vocab:  # a dataset may use only the first ids of its tokenizer
        fail(f"--sample_prompt={c.sample_prompt!r} has token ids beyond the model's vocabulary of {vocab}"
             if c.sample_prompt else
             f"the evaluation sample starts from <|endoftext|> (id {enc.eot_token}), beyond the model's vocabulary "
             f"of {vocab} (meta.json's vocab_size): give a --sample_prompt within it, or --sample_tokens=0")
    optimizer = make_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), device)
    scaler = make_scaler(device, dtype)
    log_path = os.path.join(c.out_dir, "log.jsonl")
    start_iter, best_val_loss = restore_run(ckpt, optimizer, scaler, log_path, write_files=master)
    fast = torch.compile(model) if c.compile else model  # checkpoints come from model: no _orig_mod. keys
    trained = fast if world_size == 1 else DDP(fast, device_ids=[device] if device.startswith("cuda") else None)
    wandb_run = None
    if c.wandb_log and master:
        import wandb
        wandb_run = wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=cfg)

    tokens_per_iter = world_size * c.gradient_accumulation_steps * c.batch_size * c.block_size
    flops_per_iter = flops_per_token(model.config, model.num_params(), c.block_size) * tokens_per_iter
    peak = c.peak_flops or (312e12 if device.startswith("cuda") else matmul_flops(device, dtype))
    decay_iters = c.lr_decay_iters or c.max_iters
    if master:
        print(f"{model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per iteration, "
              f"{world_size} process(es) on {device}, {dtype}, peak {peak / 1e12:.3f} TFLOP/s for MFU",
              flush=True)

    def checkpoint(it, evaluated=True):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), **run_state(
            optimizer, scaler, it, best_val_loss, cfg, model, meta["tokenizer"], log_path, script="train.py",
            evaluated=evaluated)})

    it = start_iter
    t_last, it_last = time.perf_counter(), it
    with stop_signals(announce=master) as caught:
        while True:
            if due_for_eval(it, c.eval_interval, c.max_iters, ckpt, start_iter):
                losses = evaluate(fast, get_batch, c.eval_iters, rank, world_size, device, dtype)
                best_val_loss = min(best_val_loss, losses["val"])
                if master:
                    text = ""
                    if c.sample_tokens:
                        torch.manual_seed(c.seed)  # the same draw at every evaluation, so samples compare
                        with autocast(device, dtype):
                            out = model.eval().generate(torch.tensor([prompt], device=device), c.sample_tokens,
                                                        temperature=0.8, top_k=200)
                        model.train()
                        text = enc.decode(out[0, len(prompt):].tolist())
                    print(f"eval {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                          f"(best {best_val_loss:.4f}), sample: {text!r}", flush=True)
                    log_record(log_path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                                          "best_val_loss": best_val_loss, "sample": text}, wandb_run)
                    plot_log(log_path, os.path.join(c.out_dir, "loss.png"))
                    checkpoint(it)
                t_last, it_last = time.perf_counter(), it  # evaluation time is not training time
            if it >= c.max_iters:
                break

            lr = lr_at(it, c.learning_rate, c.min_lr, c.warmup_iters, decay_iters)
            loss = train_step(trained, optimizer, scaler, get_batch, it, lr, c.gradient_accumulation_steps, rank,
                              world_size, device, dtype, c.grad_clip, c.seed)
            if it % c.log_interval == 0:
                loss = mean_over_ranks(loss, world_size)  # waits for the step to finish: the timing is honest
                seconds = (time.perf_counter() - t_last) / (it + 1 - it_last)
                t_last, it_last = time.perf_counter(), it + 1
                record = {"iter": it, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_iter / seconds,
                          "ms": 1000 * seconds, "mfu": flops_per_iter / seconds / (peak * world_size),
                          "mem": memory_mb(device)}
                if master:
                    print(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, {record['ms']:.1f} ms/iter, "
                          f"{record['tokens_per_s']:,.0f} tokens/s, MFU {100 * record['mfu']:.2f}%, "
                          f"mem {record['mem']:,.0f} MB", flush=True)
                    log_record(log_path, record, wandb_run)
            it += 1
            stop = agreed_stop(caught, world_size, device)
            if stop and it < c.max_iters:
                if master:
                    checkpoint(it, evaluated=False)
                    print(stop_message(it, ckpt_path, "train.py", c.out_dir, world_size), flush=True)
                if world_size > 1:
                    dist.barrier()  # no process may exit while the checkpoint is being written
                teardown_ddp()
                raise SystemExit(128 + stop)
    if master:
        print(f"done: {c.max_iters} iterations; checkpoint in {ckpt_path}, log in {log_path}")
    if wandb_run is not None:
        wandb_run.finish()
    teardown_ddp()


if __name__ == "__main__":
    run(main)
