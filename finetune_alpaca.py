"""Instruction-tune GPT-2 on Stanford Alpaca: a full fine-tune, LoRA, or QLoRA (LoRA on 4-bit NF4 weights).

    python finetune_alpaca.py --init_from=gpt2 --lora_rank=8 --batch_size=8
    python finetune_alpaca.py --init_from=gpt2-medium --lora_rank=16 --quantize=nf4     # QLoRA
    python finetune_alpaca.py --init_from=gpt2 --lora_rank=0 --subset=2000              # full fine-tune
    python finetune_alpaca.py --init_from=resume --out_dir=out-alpaca                   # go on after a stop
    torchrun --standalone --nproc_per_node=4 finetune_alpaca.py --init_from=gpt2-xl --lora_rank=0 --fsdp=True
    torchrun --standalone --nproc_per_node=4 finetune_alpaca.py --fsdp=True --activation_checkpointing=True
    python sample.py --init_from=gpt2 --adapter=out-alpaca --instruction="Explain gravity to a child."

An example is a prompt, then the response followed by <|endoftext|>. The prompt is Stanford
Alpaca's template, verbatim, then one newline: the template ends with "### Response:" and the
response starts on the next line. sample.py --instruction builds its prompt with the same
datasets.alpaca_prompt(), so the model sees at inference exactly what it saw in training. Prompt and
response are tokenized separately, so the boundary between them is a token boundary; the loss
skips the prompt (label -100, unless --mask_prompt=False) and the padding, and counts the
<|endoftext|>, so the model learns to stop. Examples longer than max_seq_len tokens (prompt,
response and <|endoftext|>) are dropped, not truncated: a cut response would teach the model to
stop mid-sentence, or never. Batches are padded to their longest example only.

Training uses train.py's pieces from lib/: the LR schedule, AdamW or Muon and the optimizer step (gradient
accumulation, clipping, AMP, GradScaler) and evaluation in lib/training.py, atomic checkpoints, stops,
the log and its plot; its loop is train.py's.
As there, the batch of every micro-step is a pure function of (seed, iteration, index), so a
resumed run repeats an uninterrupted one exactly. A LoRA run writes out_dir/adapter.safetensors
+ adapter.json (a few MB); a full fine-tune writes the whole model into out_dir/ckpt.pt;
--merge=True also writes out_dir/merged, a Hugging Face-format model with the adapter folded in.
"""
import functools
import json
import math
import os
from types import SimpleNamespace

import lib  # noqa: F401 -- first: a Ctrl-C while torch loads then ends the script with one line
import torch

import gpt
from lib import checkpoints, cli, datasets, downloads, logs, measure, models, processes, speed, stops, training

# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
init_from = "gpt2"        # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF directory | resume
out_dir = "out-alpaca"
# data
data = "alpaca-cleaned"   # alpaca-cleaned (yahma's fixes of the original) | alpaca (Stanford's 52,002 records)
data_path = ""            # only with data=alpaca-cleaned; a local JSON file of Alpaca's records instead
alpaca_url = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
val_size = 0              # >= 0; held-out records, chosen by the seed; 0: the smaller of 500 and a tenth of them
subset = 0                # >= 0; train on only this many records (0: all of them)
max_seq_len = 0           # >= 0; longest example kept, in tokens; 0: the smaller of 512 and the model's context
mask_prompt = True        # no loss on the prompt's tokens
# LoRA / QLoRA
lora_rank = 8             # >= 0; 0: a full fine-tune of every weight
lora_alpha = 16.0         # > 0; the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.05       # [0, 1)
quantize = "none"         # none | nf4 (QLoRA: the base weights in 4 bits; needs lora_rank > 0)
double_quant = True       # only with quantize=nf4; quantize NF4's scales too (4.127 instead of 4.5 bits per weight)
merge = False             # at the end, also write out_dir/merged as a Hugging Face model
# optimization
optimizer = "adamw"       # adamw | muon: Muon for the blocks' matrices (a LoRA run's A and B), AdamW for the rest
batch_size = 8            # >= 1
gradient_accumulation_steps = 4  # >= 1; per process: a step sees world_size * this * batch_size examples
max_iters = 1000          # >= 0
learning_rate = 0.0       # >= 0; 0: 3e-4 with LoRA, 3e-5 for a full fine-tune; decays to a tenth
warmup_iters = 50         # >= 0
weight_decay = 0.0        # >= 0
beta1 = 0.9               # [0, 1)
beta2 = 0.999             # [0, 1)
grad_clip = 1.0           # >= 0; 0: no clipping
dropout = 0.0             # [0, 1); in the base model
# evaluation and logs
eval_interval = 100       # >= 1
eval_iters = 20           # >= 1; batches per split in an evaluation
log_interval = 10         # >= 1
eval_prompts = 3          # >= 0; held-out instructions answered (greedily) at every evaluation
sample_tokens = 128       # >= 1; the longest of those answers
# system
device = "auto"           # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"            # auto | float32 | bfloat16 | float16
fsdp = False              # under torchrun, shard weights, gradients and AdamW's state over the processes (else DDP)
activation_checkpointing = False  # recompute each block's activations in the backward pass instead of keeping them
chunked_loss = False      # the loss without the (batch, length, vocab) logits (lib/speed.py): less memory; slower on a CPU
seed = 1337               # [0, 2**63)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
# what a resumed run may not change: the data, its order and the trained layers
FIXED_KEYS = ("data", "data_path", "val_size", "subset", "max_seq_len", "mask_prompt", "lora_rank", "lora_alpha",
              "quantize", "double_quant", "batch_size", "gradient_accumulation_steps", "seed", "optimizer")

# ----------------------------------------------------------------------------- prompts

def encode_example(enc, record):
    """(ids, n_prompt): the prompt's tokens then the response's and <|endoftext|>; the first
    n_prompt ids are the prompt. Text is encoded as ordinary text: an "<|endoftext|>" inside a
    record is letters, not the special token."""
    prompt = enc.encode_ordinary(datasets.alpaca_prompt(record["instruction"], record["input"]))
    response = enc.encode_ordinary(record["output"]) + [enc.eot_token]
    return prompt + response, len(prompt)


def collate(examples, mask_prompt, pad_id):
    """Inputs x and targets y (B, T), T the longest example's length - 1. y is x shifted by one,
    with -100 (no loss) on the padding and, with mask_prompt, wherever the token to predict is
    still part of the prompt: the first target is the response's first token."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, :len(ids) - 1] = torch.tensor(ids[1:])
        if mask_prompt:
            y[row, :n_prompt - 1] = -100
    return x, y


# ----------------------------------------------------------------------------- data

def alpaca_file(c):
    """The JSON file to train on: --data_path, or the chosen data set, downloaded once into the cache
    (HF_ENDPOINT and --alpaca_url let a mirror stand in for the hub and GitHub)."""
    if c.data_path:
        return c.data_path
    try:
        if c.data == "alpaca-cleaned":
            return downloads.hub_file("yahma/alpaca-cleaned", "alpaca_data_cleaned.json", repo_type="dataset")
        if c.data == "alpaca":
            return downloads.download(c.alpaca_url, downloads.cache_dir() / "alpaca" / "alpaca_data.json")
    except downloads.DownloadError as e:
        cli.fail(f"{e}. Without it: a local copy with --data_path=file.json"
                 f"{', or HF_ENDPOINT=<a mirror of the hub>' if c.data == 'alpaca-cleaned' else ', or another --alpaca_url'}")
    cli.fail(f"--data={c.data} is not one of alpaca-cleaned, alpaca (or give --data_path=file.json)")


def read_records(path):
    """The records of an Alpaca-format file, each checked: instruction and output strings, input a
    string or absent."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        cli.fail(f"cannot read {path} as Alpaca JSON: {e}")
    if not isinstance(records, list) or not records:
        cli.fail(f"{path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
                and isinstance(r.get("input", ""), str)):
            cli.fail(f"{path}: record {i} is not {{\"instruction\": str, \"input\": str, \"output\": str}}: {str(r)[:80]}")
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in records]


def split_records(records, val_size, subset, seed, announce=True):
    """(train, val): a shuffle seeded by seed, val_size records held out (0: the smaller of 500 and a
    tenth of the records, at least 1), then --subset of the rest. The held-out records do not
    depend on subset, so runs on different subsets compare."""
    if len(records) < 2:
        cli.fail(f"{len(records)} record: too few to hold any out for validation")
    if not val_size:
        val_size = max(1, min(500, len(records) // 10))
        if announce:
            print(f"--val_size=0: holding out {val_size} of the {len(records)} records")
    if val_size >= len(records):
        cli.fail(f"--val_size={val_size} must be below the {len(records)} records, to leave some to train on")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(datasets.seed_for(seed, "split")))
    shuffled = [records[i] for i in order.tolist()]
    rest = shuffled[val_size:]
    if subset > len(rest) and announce:
        print(f"note: --subset={subset}, but {len(rest)} records are left after the held-out ones: training on all "
              f"{len(rest)}")
    return rest[:subset] if subset else rest, shuffled[:val_size]


def tokenize(enc, records, max_seq_len, name, announce=True):
    examples = [encode_example(enc, r) for r in records]
    kept = [e for e in examples if len(e[0]) <= max_seq_len]
    if announce and len(kept) < len(examples):
        print(f"{name}: dropped {len(examples) - len(kept)} of {len(examples)} examples longer than "
              f"max_seq_len={max_seq_len} tokens")
    return kept


def batch_loader(splits, batch_size, micro_per_step, mask_prompt, pad_id, device, seed):
    """(get_batch, step_tokens). get_batch(split, key, index) is what training.train_step and
    training.evaluate call: for key "eval", batch `index` of the split's examples in order; for an
    iteration, micro-batch number key * micro_per_step + index of a walk through the training
    examples, epoch after epoch, each epoch in its own order seeded by (seed, epoch).
    step_tokens(it) counts the tokens the iteration reads."""
    examples = splits["train"]
    per_epoch = len(examples) // batch_size

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):
        gen = torch.Generator().manual_seed(datasets.seed_for(seed, "epoch", epoch))
        return torch.randperm(len(examples), generator=gen).tolist()

    def rows(split, key, index):
        if key == "eval":
            return splits[split][index * batch_size:(index + 1) * batch_size]
        epoch, k = divmod(key * micro_per_step + index, per_epoch)
        return [examples[i] for i in epoch_order(epoch)[k * batch_size:(k + 1) * batch_size]]

    def get_batch(split, key, index):
        x, y = collate(rows(split, key, index), mask_prompt, pad_id)
        return x.to(device), y.to(device)

    def step_tokens(it):
        return sum(len(ids) - 1 for index in range(micro_per_step) for ids, _ in rows("train", it, index))

    return get_batch, step_tokens


# ----------------------------------------------------------------------------- model

def prepare_model(c, ckpt, vocab_size):
    """The model to train, as train.py builds it: the base model with LoRA layers (on NF4 weights
    for QLoRA), or all of it trainable (lora_rank=0). A resumed full fine-tune comes whole from
    its checkpoint; a resumed LoRA run rebuilds the frozen base from init_from and loads the rest."""
    if ckpt is not None and not c.lora_rank:
        return models.model_from_checkpoint(ckpt, vars(c))
    model = models.build_model(c, vocab_size, ckpt=None)
    if ckpt is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(ckpt["adapter"][name])
    return model


@torch.no_grad()
def respond(model, enc, record, max_new_tokens, device, dtype, stop_early=True):
    """The model's greedy response to a record's instruction (and input). stop_early: stop at
    <|endoftext|>; under FSDP every process generates all max_new_tokens, so that none can stop
    while the others still need it for the next forward pass, and the response is cut there."""
    ids = enc.encode_ordinary(datasets.alpaca_prompt(record["instruction"], record["input"]))
    model.eval()
    with cli.autocast(device, dtype):
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0,
                             eos_id=enc.eot_token if stop_early else None)
    model.train()
    new = out[0, len(ids):].tolist()
    return enc.decode(new[:new.index(enc.eot_token)] if enc.eot_token in new else new)


# ----------------------------------------------------------------------------- the run

def sequence_length(max_seq_len, context):
    """The longest example kept: --max_seq_len, which must fit the model's context, or by default
    the smaller of 512 and that context."""
    if max_seq_len > context:
        cli.fail(f"--max_seq_len={max_seq_len} is longer than the model's context of {context} tokens")
    return max_seq_len or min(512, context)


def main(argv=None):
    cfg, ckpt = checkpoints.run_config(DEFAULTS, FIXED_KEYS, argv, __doc__, __file__)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if ckpt is not None:
        cfg["init_from"] = ckpt["config"]["init_from"]  # the base model, so that the next resume finds it too
    for key in ("init_from", "data_path"):  # recorded so that a resume from another folder finds them
        if cfg[key] and os.path.exists(cfg[key]):
            cfg[key] = os.path.abspath(cfg[key])
    c = SimpleNamespace(**cfg)
    models.check_adapters(cfg)
    training.check_optimizer(c.optimizer, c.fsdp)
    if c.init_from == "scratch":
        cli.fail("fine-tuning starts from trained weights: --init_from=gpt2 (or another GPT-2, a HF directory, or "
                 "a train.py out_dir)")
    if models.run_dir(c.init_from) and checkpoints.load(os.path.join(c.init_from, "ckpt.pt"))["tokenizer"] != "gpt2":
        cli.fail(f"--init_from={c.init_from} was trained on other token ids than gpt2's, which Alpaca's prompts are "
                 f"encoded with: fine-tune a model trained with --tokenizer=gpt2")
    cli.writable_dir(c.out_dir)
    lr = c.learning_rate or (3e-4 if c.lora_rank else 3e-5)
    rank, world_size, device = processes.setup_ddp(cli.pick_device(c.device))
    master = rank == 0  # only the first process writes files and prints
    if ckpt is not None:
        cfg["gradient_accumulation_steps"] = c.gradient_accumulation_steps = checkpoints.resumed_accumulation(
            ckpt, c.gradient_accumulation_steps, world_size)
    dtype = cli.pick_dtype(c.dtype, device)
    processes.check_fsdp(c.fsdp, c.quantize, dtype, world_size, resuming=ckpt is not None)
    speed.keep_freed_memory()
    try:
        enc = datasets.get_tokenizer("gpt2")
    except downloads.DownloadError as e:
        cli.fail(str(e))

    with processes.rank_zero_first():  # the data and the weights are downloaded once
        train_records, val_records = split_records(read_records(alpaca_file(c)), c.val_size, c.subset, c.seed,
                                                   master)
        model = prepare_model(c, ckpt, enc.n_vocab).to(device)
    max_seq_len = sequence_length(c.max_seq_len, model.config.block_size)
    splits = {"train": tokenize(enc, train_records, max_seq_len, "train", master),
              "val": tokenize(enc, val_records, max_seq_len, "val", master)}
    if len(splits["train"]) < c.batch_size or not splits["val"]:
        cli.fail(f"{len(splits['train'])} training and {len(splits['val'])} validation examples fit in "
                 f"max_seq_len={max_seq_len}: too few for --batch_size={c.batch_size}")
    micro_per_step = world_size * c.gradient_accumulation_steps
    get_batch, step_tokens = batch_loader(splits, c.batch_size, micro_per_step, c.mask_prompt, enc.eot_token,
                                          device, c.seed)
    eval_iters = min(c.eval_iters, math.ceil(len(splits["val"]) / c.batch_size),
                     math.ceil(len(splits["train"]) / c.batch_size))
    held_out = val_records[:c.eval_prompts]
    if c.eval_prompts > len(held_out) and master:
        print(f"note: --eval_prompts={c.eval_prompts}, but {len(held_out)} records are held out: answering those")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.num_params(non_embedding=False)
    model.activation_checkpointing = c.activation_checkpointing
    sharded = c.fsdp and world_size > 1
    step_dtype = processes.shard_model(model, device, dtype) if sharded else dtype  # what autocast casts to
    optimizer = training.make_optimizer(model, lr, c.weight_decay, (c.beta1, c.beta2), device, c.optimizer)
    scaler = training.make_scaler(device, dtype)
    log_path = os.path.join(c.out_dir, "log.jsonl")
    start_iter, best_val_loss = checkpoints.restore(ckpt, model, optimizer, scaler, log_path, write_files=master)
    trained = processes.data_parallel(model, world_size, sharded, device)
    if master:
        mode = "full fine-tune" if not c.lora_rank else "QLoRA" if c.quantize == "nf4" else "LoRA"
        print(f"{mode} of {c.init_from}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; "
              f"{len(splits['train'])} training, {len(splits['val'])} validation examples; "
              f"{world_size} process(es) ({processes.split_name(world_size, sharded)}) on {device}, {dtype}\n"
              f"{processes.held_per_process(model, optimizer)}")

    def checkpoint(it, evaluated=True):
        """Every process takes part (FSDP gathers the shards); rank 0 writes."""
        # a LoRA run keeps only what trains: the frozen base comes back from init_from
        model_state, optimizer_state = checkpoints.full_state(model, optimizer, trainable_only=bool(c.lora_rank))
        if not master:
            return
        state = checkpoints.run_state(optimizer_state, scaler, it, best_val_loss, cfg, model, "gpt2", log_path,
                                      script="finetune_alpaca.py", world_size=world_size, evaluated=evaluated)
        resume = stops.resume_command("finetune_alpaca.py", c.out_dir, world_size)
        if c.lora_rank:
            try:
                gpt.save_adapter(model, c.out_dir, base_model=c.init_from, state=model_state)
            except OSError as e:
                cli.fail(f"cannot write the adapter in {c.out_dir}: {e.strerror or e}; the last one written is whole: "
                         f"make room or fix the folder, then resume with: {resume}")
            state["adapter"] = model_state
        else:
            state["model"] = model_state
        checkpoints.save(ckpt_path, state, resume=resume)

    it = start_iter
    clock, tokens = measure.Clock(it), 0
    with stops.stop_signals(announce=master) as caught:
        while True:
            if training.due_for_eval(it, c.eval_interval, c.max_iters, ckpt, start_iter):
                losses = training.evaluate(model, get_batch, eval_iters, rank, world_size, device, step_dtype)
                best_val_loss = min(best_val_loss, losses["val"])
                responses = []
                if master or sharded:  # under FSDP every process generates: the forward passes gather weights
                    with processes.gathered(model, sharded):
                        responses = [{**r, "response": respond(model, enc, r, c.sample_tokens, device, step_dtype,
                                                               stop_early=not sharded)} for r in held_out]
                if master:
                    shown = "".join(f"\n  {r['instruction']!r} -> {r['response']!r}" for r in responses)
                    logs.log_eval(log_path, it, losses, best_val_loss, {"responses": responses}, printed=shown)
                checkpoint(it)
                clock.restart(it)  # evaluation time is not training time
                tokens = 0
            if it >= c.max_iters:
                break
            step_lr = training.lr_at(it, lr, lr / 10, c.warmup_iters, c.max_iters)
            loss = training.train_step(trained, optimizer, scaler, get_batch, it, step_lr,
                                       grad_accum=c.gradient_accumulation_steps, rank=rank, world_size=world_size,
                                       device=device, dtype=step_dtype, grad_clip=c.grad_clip, seed=c.seed)
            tokens += step_tokens(it)
            if it % c.log_interval == 0:
                loss = processes.mean_over_ranks(loss, world_size)
                steps = it + 1 - clock.it
                seconds = clock.lap(it)
                if master:
                    logs.log_step(log_path, {"iter": it, "loss": loss, "lr": step_lr, "tokens_per_s": tokens / seconds / steps,
                                             "ms": 1000 * seconds, "mem": measure.memory_mb(device)})
                tokens = 0
            it += 1
            stop = stops.agreed_stop(caught, world_size, device)
            if stop and it < c.max_iters:
                checkpoint(it, evaluated=False)
                stops.exit_resumable(stop, it, c.out_dir, "finetune_alpaca.py", world_size, master)
    if master:
        print(logs.done_line(start_iter, c.max_iters, ckpt_path, log_path))
    if c.merge:
        write_merged(c, model, enc.n_vocab, master)
    processes.exit_ddp()


def write_merged(c, model, vocab_size, master):
    """--merge=True: the trained model as a plain GPT-2 in the Hugging Face format, its adapters
    folded in. Made on rank 0 from the gathered weights, on a fresh copy: the same under FSDP."""
    state = checkpoints.full_model_state(model)  # every process takes part
    if master:
        plain = prepare_model(c, None, vocab_size)
        plain.load_state_dict(state)
        merged_dir = os.path.join(c.out_dir, "merged")
        gpt.merge_and_unload(plain).save_pretrained(merged_dir)
        print(f"wrote the merged model to {merged_dir}")


if __name__ == "__main__":
    cli.run(main)
