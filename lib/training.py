"""One optimizer step and an evaluation: the LR schedule, AdamW or Muon, gradient accumulation and clipping."""
import math

import torch
import torch.distributed as dist

from lib.cli import autocast, fail
from lib.datasets import seed_for


def lr_at(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup over warmup_iters, then a cosine from learning_rate down to min_lr at
    decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def check_optimizer(name, fsdp):
    """--optimizer's value and what it cannot go with, before any work."""
    if name not in ("adamw", "muon"):
        fail(f"--optimizer={name} is not one of adamw, muon")
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        fail(f"--optimizer=muon needs torch.optim.Muon, which came with torch 2.9, and this is torch "
             f"{torch.__version__}: upgrade torch (pip install -U torch), or use --optimizer=adamw")
    if name == "muon" and fsdp:
        fail("--optimizer=muon orthogonalizes each whole matrix, and under --fsdp=True a process holds a shard of "
             "it: use DDP (--fsdp=False), or --optimizer=adamw")


def muon_params(model):
    """The parameters Muon updates: the trainable 2-D matrices inside the blocks (attention's and
    the MLP's, or a LoRA run's A and B there). The rest stay with AdamW, as in nanochat and
    modded-nanogpt: the token embedding (with the tied output matrix), the position table,
    biases and norm gains, which are lookups or vectors rather than maps between hidden states."""
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


class MuonAdamW(tuple):
    """(Muon, AdamW), stepped as one optimizer; (Muon,) where nothing else trains (LoRA adapters).
    The distributed state-dict functions of lib/checkpoints.py take it as a list of optimizers
    (one state, keyed by parameter name); GradScaler takes it as one optimizer, so a float16
    overflow skips every step."""

    @property
    def param_groups(self):
        return [group for optimizer in self for group in optimizer.param_groups]

    def step(self):
        for optimizer in self:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self:
            optimizer.zero_grad(set_to_none=set_to_none)


def make_optimizer(model, learning_rate, weight_decay, betas, device, optimizer="adamw"):
    """AdamW over the trainable parameters, decaying the matrices (linear layers, embeddings) but
    not biases and LayerNorm gains. parameters() yields the tied wte/lm_head matrix once.
    optimizer="muon": Muon for muon_params(model), AdamW as above for the rest (MuonAdamW)."""
    muon = muon_params(model) if optimizer == "muon" else []
    taken = {id(p) for p in muon}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one pass (on CUDA, and on the CPU: 5x faster there)
    fused = device.startswith("cuda") or device == "cpu"
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    if optimizer == "adamw":
        return adamw
    # Muon's update is an orthogonalized matrix, whose size depends on the matrix's shape, not on
    # the gradient's. match_rms_adamw scales it by 0.2 sqrt(max(rows, cols)) to the RMS of a
    # typical AdamW update (Moonshot's "Muon is Scalable for LLM Training"): learning_rate then
    # means the same step size for both optimizers, and the warmup and cosine schedule, which
    # train_step gives every group, carries over. Torch's default ("original", sqrt(max(1, rows /
    # cols))) makes updates 2-6x smaller than AdamW's (cpu_tiny to GPT-2 124M), by a factor that
    # changes with width and shape. Momentum: torch's 0.95, with Nesterov, as Muon's authors use it.
    muon = torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW((muon, adamw) if params else (muon,))  # an AdamW of empty groups upsets the state-dict functions


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


def accumulation_for(total_tokens, batch_size, block_size, world_size):
    """gradient_accumulation_steps that make an optimizer step total_tokens tokens, as llm.c and
    build-nanogpt fix it: the same step on 1 GPU or 8, only more micro-batches on fewer."""
    micro = world_size * batch_size * block_size  # tokens in one micro-batch of every process
    if total_tokens % micro:
        fail(f"--total_batch_size={total_tokens} is not a multiple of {world_size} process(es) x --batch_size="
             f"{batch_size} x --block_size={block_size} = {micro} tokens: make it one, or change --batch_size")
    return total_tokens // micro


def evaluations_after(it, eval_interval, max_iters):
    """How many evaluations a run has left after iteration it: at the multiples of eval_interval
    up to max_iters, and at max_iters."""
    return max_iters // eval_interval - it // eval_interval + (max_iters % eval_interval != 0)


def due_for_eval(it, eval_interval, max_iters, ckpt, start_iter):
    """Evaluate (and checkpoint) every eval_interval iterations and at the end, except where the run
    resumes from a checkpoint written after that evaluation."""
    if ckpt is not None and it == start_iter and ckpt.get("evaluated", True):
        return False
    return it % eval_interval == 0 or it == max_iters
