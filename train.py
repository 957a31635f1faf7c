"""Train a GPT from scratch, from GPT-2's weights, or on from where a run stopped.

    python train.py --dataset=tinystories --batch_size=8
    python train.py config/tinystories.py --max_iters=2000 --compile=False
    torchrun --standalone --nproc_per_node=2 train.py config/tinystories.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --fsdp=True   # sharded: FSDP
    python train.py --init_from=resume --out_dir=out-tinystories
    python train.py --init_from=gpt2 --dataset=shakespeare --learning_rate=3e-5
    python train.py --init_from=gpt2 --dataset=wikitext2 --lora_rank=8 --quantize=nf4   # QLoRA

Settings: the defaults below, then config files given as bare arguments, then --key=value.
main() sets up the data, the model and the optimizer, then runs the training loop. The machinery
it calls lives in lib/, one module per mechanism, named where it is used: datasets (batches),
training (one optimizer step, evaluation), processes (DDP, FSDP), checkpoints (save, exact
resume), stops (Ctrl-C, SIGTERM), logs and measure (MFU, memory). finetune_alpaca.py uses them too.

A batch is a pure function of (seed, iteration, micro-batch index), and so is the dropout noise:
one process accumulating G micro-batches and G processes taking one each compute the same step,
and a resumed run repeats an uninterrupted one bit for bit, with no random state to carry over.
"""
import os
import time
from types import SimpleNamespace

import lib  # noqa: F401 -- first: a Ctrl-C while torch loads then ends the script with one line
import torch

from lib import (benchmarks, checkpoints, cli, datasets, downloads, logs, measure, models, processes, speed, stops,
                 training)

# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
# I/O
out_dir = "out"
eval_interval = 250       # >= 1; evaluate, sample, plot and checkpoint every this many iterations
eval_iters = 50           # >= 1; batches per split in an evaluation, spread over the processes
log_interval = 10         # >= 1
init_from = "scratch"     # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF directory
sample_prompt = ""        # the fixed prompt sampled from at each evaluation; empty: <|endoftext|>
sample_tokens = 48        # >= 0; 0: no sample
eval_tasks = ""           # benchmarks scored at every evaluation, e.g. hellaswag or wikitext2,lambada (eval.py's tasks)
eval_limit = 0            # >= 0; only the first N examples of each eval task (WikiText: lines); 0: all
wandb_log = False
wandb_project = "gpt2ref"
wandb_run_name = "train"
# data: data_dir/dataset/{train,val}.bin (or numbered shards, train_000001.bin, ...) and meta.json, from prepare_data.py
dataset = "tinystories"
data_dir = "data"
batch_size = 8            # >= 1
block_size = 256          # >= 1
gradient_accumulation_steps = 1  # >= 1; per process: a step sees world_size * this * batch_size sequences
total_batch_size = 0      # >= 0, only with gradient_accumulation_steps=1; tokens per step: sets the accumulation
# model (ignored for gpt2* weights, which bring their own shape)
n_layer = 6               # >= 1
n_head = 6                # >= 1
n_embd = 384              # >= 1; a multiple of n_head
dropout = 0.0             # [0, 1)
bias = True
pos_emb = "learned"       # learned | rope
mlp = "gelu"              # gelu | swiglu
# parameter-efficient training: LoRA adapters on frozen weights (gpt.py's Part III)
lora_rank = 0             # >= 0; 0: train every weight
lora_alpha = 16.0         # > 0; the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.05       # [0, 1)
quantize = "none"         # none | nf4: the frozen block weights in 4 bits, QLoRA (needs lora_rank > 0)
# AdamW and the learning-rate schedule
optimizer = "adamw"       # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (docs/training.md)
learning_rate = 6e-4      # > 0
max_iters = 5000          # >= 0
weight_decay = 0.1        # >= 0
beta1 = 0.9               # [0, 1)
beta2 = 0.95              # [0, 1)
grad_clip = 1.0           # >= 0; 0: no clipping
warmup_iters = 100        # >= 0
lr_decay_iters = 0        # >= 0, > warmup_iters unless 0; cosine decay to min_lr ends here; 0: at max_iters
min_lr = 6e-5             # >= 0, <= learning_rate
# system
device = "auto"           # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"            # auto | float32 | bfloat16 | float16 (float16 adds a GradScaler)
compile = False           # torch.compile the model
chunked_loss = False      # the loss without the (batch, block, vocab) logits (lib/speed.py): less memory; slower on a CPU
fsdp = False              # under torchrun, shard weights, gradients and AdamW's state over the processes (else DDP)
activation_checkpointing = False  # recompute each block's activations in the backward pass instead of keeping them
seed = 1337               # [0, 2**63)
peak_flops = 0.0          # >= 0; FLOP/s that MFU is against; 0: a matmul in the training dtype, measured at start-up
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos_emb", "mlp",  # fixed once a run starts
              "lora_rank", "lora_alpha", "quantize", "optimizer")


def check(c):
    """The settings that cannot go together, refused before anything is loaded; the eval tasks' names."""
    models.check_adapters(vars(c))
    training.check_optimizer(c.optimizer, c.fsdp)
    if c.compile and c.activation_checkpointing and (c.dropout or c.lora_rank and c.lora_dropout):
        cli.fail("--activation_checkpointing with --compile recomputes dropout with other masks than the forward "
                 "pass drew (torch.compile does not replay the random state), so the gradients would be wrong: "
                 "use --dropout=0 (and --lora_dropout=0), or --compile=False")
    if c.wandb_log:
        logs.require_wandb()
    task_names = benchmarks.parse_tasks(c.eval_tasks, "--eval_tasks")
    if any(name in benchmarks.WIKITEXT for name in task_names):
        datasets.require_pyarrow()
    cli.writable_dir(c.out_dir)
    return task_names


def tokenizer(c, meta, ckpt):
    """The dataset's tokenizer, which must be the one the model reads: GPT-2's weights read gpt2's
    ids, a resumed run those it began with."""
    if ckpt is not None or models.run_dir(c.init_from):
        reads = (ckpt or checkpoints.load(os.path.join(c.init_from, "ckpt.pt")))["tokenizer"]
    else:
        reads = None if c.init_from == "scratch" else "gpt2"
    if reads and meta["tokenizer"] != reads:
        model = "the checkpoint's model" if ckpt is not None else f"--init_from={c.init_from}"
        cli.fail(f"{os.path.join(c.data_dir, c.dataset)} holds {meta['tokenizer']} token ids, and {model} reads "
                 f"{reads} ids: prepare the data with --tokenizer={reads}, or start from scratch")
    try:
        return datasets.get_tokenizer(meta["tokenizer"])
    except (ValueError, downloads.DownloadError) as e:
        cli.fail(str(e))


def evaluation_prompt(c, enc, model):
    """The tokens each evaluation's sample starts from, checked against the model's vocabulary and context."""
    if c.block_size > model.config.block_size:
        cli.fail(f"--block_size={c.block_size} is longer than the model's context of {model.config.block_size}")
    prompt = enc.encode(c.sample_prompt, allowed_special={"<|endoftext|>"}) if c.sample_prompt else [enc.eot_token]
    vocab = model.config.vocab_size
    if c.sample_tokens and max(prompt) >= vocab:  # a dataset may use only the first ids of its tokenizer
        cli.fail(f"--sample_prompt={c.sample_prompt!r} has token ids beyond the model's vocabulary of {vocab}"
                 if c.sample_prompt else
                 f"the evaluation sample starts from <|endoftext|> (id {enc.eot_token}), beyond the model's vocabulary "
                 f"of {vocab} (meta.json's vocab_size): give a --sample_prompt within it, or --sample_tokens=0")
    return prompt


def benchmark_scores(model, tasks, batch_size, sharded, rank, world_size, device, dtype):
    """{task_metric: value} for the --eval_tasks. They are scored past forward(), like generation:
    under FSDP the top-level weights are gathered by hand."""
    scores = {}
    with processes.gathered(model, sharded):
        for task in tasks:
            for metric, value in benchmarks.run_task(model, task, batch_size, rank, world_size, device, dtype).items():
                scores[f"{task.name}_{metric}"] = value
    return scores


def sample(model, enc, prompt, c, sharded, device, dtype):
    """The sample text of an evaluation, from a fixed seed, so that samples compare. Under FSDP
    every process generates it: the forward passes gather weights from all of them."""
    if not c.sample_tokens:
        return ""
    torch.manual_seed(c.seed)
    with processes.gathered(model, sharded), cli.autocast(device, dtype):
        out = model.eval().generate(torch.tensor([prompt], device=device), c.sample_tokens, temperature=0.8, top_k=200)
    model.train()
    return enc.decode(out[0, len(prompt):].tolist())


def main(argv=None):
    cfg, ckpt = checkpoints.run_config(DEFAULTS, MODEL_KEYS, argv, __doc__, __file__)
    cfg["data_dir"] = os.path.abspath(cfg["data_dir"])  # recorded so that a resume from another folder finds it
    c = SimpleNamespace(**cfg)
    task_names = check(c)
    rank, world_size, device = processes.setup_ddp(cli.pick_device(c.device))
    master = rank == 0  # only the first process writes files and prints
    if c.total_batch_size:
        cfg["gradient_accumulation_steps"] = c.gradient_accumulation_steps = training.accumulation_for(
            c.total_batch_size, c.batch_size, c.block_size, world_size)
    elif ckpt is not None:
        cfg["gradient_accumulation_steps"] = c.gradient_accumulation_steps = checkpoints.resumed_accumulation(
            ckpt, c.gradient_accumulation_steps, world_size)
    dtype = cli.pick_dtype(c.dtype, device)
    processes.check_fsdp(c.fsdp, c.quantize, dtype, world_size, resuming=ckpt is not None)
    speed.keep_freed_memory()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # the data, the model, the optimizer
    folder = os.path.join(c.data_dir, c.dataset)
    meta = datasets.read_meta(folder, c.block_size)
    get_batch = datasets.batch_loader(folder, c.batch_size, c.block_size, device, c.seed)
    enc = tokenizer(c, meta, ckpt)
    with processes.rank_zero_first():  # GPT-2's weights and the benchmarks' files are downloaded once
        model = models.build_model(c, meta["vocab_size"], ckpt).to(device)
        tasks = [benchmarks.load_task(name, enc, model.config, limit=c.eval_limit) for name in task_names]
    prompt = evaluation_prompt(c, enc, model)
    model.activation_checkpointing = c.activation_checkpointing
    sharded = c.fsdp and world_size > 1
    step_dtype = processes.shard_model(model, device, dtype) if sharded else dtype  # what autocast casts to
    optimizer = training.make_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), device,
                                        c.optimizer)
    scaler = training.make_scaler(device, dtype)
    log_path = os.path.join(c.out_dir, "log.jsonl")
    start_iter, best_val_loss = checkpoints.restore(ckpt, model, optimizer, scaler, log_path, write_files=master)
    fast = torch.compile(model) if c.compile else model  # checkpoints come from model: no _orig_mod. keys
    trained = processes.data_parallel(fast, world_size, sharded, device)
    wandb_run = logs.start_wandb(c.wandb_project, c.wandb_run_name, cfg) if c.wandb_log and master else None
    tokens_per_iter = world_size * c.gradient_accumulation_steps * c.batch_size * c.block_size
    flops_per_iter = measure.flops_per_token(model.config, model.num_params(), c.block_size) * tokens_per_iter
    peak = c.peak_flops or measure.matmul_flops(device, dtype)
    if master:
        split = processes.split_name(world_size, sharded)
        micro = f"{c.gradient_accumulation_steps} micro-batch(es) of {c.batch_size} x {c.block_size}"
        print(f"{model.num_params() / 1e6:.2f}M parameters, {world_size} process(es) ({split}) on {device}, {dtype}, "
              f"peak {peak / 1e12:.3f} TFLOP/s for MFU\n{tokens_per_iter:,} tokens per step ({world_size} "
              f"process(es) x {micro}) x {c.max_iters:,} steps = {tokens_per_iter * c.max_iters:,} tokens\n"
              f"{processes.held_per_process(model, optimizer)}", flush=True)

    def checkpoint(it, evaluated=True):
        """Every process takes part (FSDP gathers the shards); rank 0 writes."""
        model_state, optimizer_state = checkpoints.full_state(model, optimizer)
        if master:
            checkpoints.save(os.path.join(c.out_dir, "ckpt.pt"), {"model": model_state, **checkpoints.run_state(
                optimizer_state, scaler, it, best_val_loss, cfg, model, meta["tokenizer"], log_path,
                script="train.py", world_size=world_size, evaluated=evaluated)},
                resume=stops.resume_command("train.py", c.out_dir, world_size))

    # the training loop
    it, estimated = start_iter, False
    clock = measure.Clock(it)
    with stops.stop_signals(announce=master) as caught:
        while True:
            if training.due_for_eval(it, c.eval_interval, c.max_iters, ckpt, start_iter):
                evaluation_began = time.perf_counter()
                losses = training.evaluate(fast, get_batch, c.eval_iters, rank, world_size, device, step_dtype)
                best_val_loss = min(best_val_loss, losses["val"])
                scores = benchmark_scores(model, tasks, c.batch_size, sharded, rank, world_size, device, step_dtype)
                text = sample(model, enc, prompt, c, sharded, device, step_dtype) if master or sharded else ""
                if master:
                    logs.log_eval(log_path, it, losses, best_val_loss, {**scores, "sample": text}, wandb_run,
                                  printed=f", sample: {text!r}")
                checkpoint(it)
                clock.restart(it, paused_since=evaluation_began)  # evaluation time is not training time
            if it >= c.max_iters:
                break
            lr = training.lr_at(it, c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters or c.max_iters)
            loss = training.train_step(trained, optimizer, scaler, get_batch, it, lr,  # forward, backward, clip, step
                                       grad_accum=c.gradient_accumulation_steps, rank=rank, world_size=world_size,
                                       device=device, dtype=step_dtype, grad_clip=c.grad_clip, seed=c.seed)
            if it % c.log_interval == 0:
                loss = processes.mean_over_ranks(loss, world_size)  # waits for the step: the timing is honest
                seconds = clock.lap(it)
                if master:
                    logs.log_step(log_path, {"iter": it, "loss": loss, "lr": lr, "ms": 1000 * seconds,
                                             "tokens_per_s": tokens_per_iter / seconds,
                                             "mfu": flops_per_iter / seconds / (peak * world_size),
                                             "mem": measure.memory_mb(device)}, wandb_run)
                    if it > start_iter and not estimated:  # the first lap held the first step's warm-up
                        logs.log_estimate(log_path, it, seconds, tokens_per_iter, c.max_iters - it - 1,
                                          training.evaluations_after(it, c.eval_interval, c.max_iters),
                                          clock.eval_seconds, wandb_run)
                        estimated = True
            it += 1
            stop = stops.agreed_stop(caught, world_size, device)
            if stop and it < c.max_iters:
                checkpoint(it, evaluated=False)
                stops.exit_resumable(stop, it, c.out_dir, "train.py", world_size, master, wandb_run)
    if master:
        print(logs.done_line(start_iter, c.max_iters, os.path.join(c.out_dir, "ckpt.pt"), log_path))
    if wandb_run is not None:
        wandb_run.finish()
    processes.exit_ddp()


if __name__ == "__main__":
    cli.run(main)
