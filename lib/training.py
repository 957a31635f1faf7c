"""One optimizer step and an evaluation: the LR schedule, AdamW, gradient accumulation and clipping."""
import math

import torch
import torch.distributed as dist

from lib.cli import autocast
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


def due_for_eval(it, eval_interval, max_iters, ckpt, start_iter):
    """Evaluate (and checkpoint) every eval_interval iterations and at the end, except where the run
    resumes from a checkpoint written after that evaluation."""
    if ckpt is not None and it == start_iter and ckpt.get("evaluated", True):
        return False
    return it % eval_interval == 0 or it == max_iters
