"""The model a script works on: fresh, GPT-2's or a checkpoint's, with the LoRA or QLoRA adapters asked for."""
import os
import sys

import torch
import torch.distributed as dist

from gpt import GPT, GPTConfig, apply_lora, load_adapter, merge_and_unload, quantize_model, read_adapter_config
from lib import checkpoints, speed
from lib.cli import fail
from lib.downloads import DownloadError


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


def run_dir(path):
    """Whether path is the out_dir of a train.py or finetune_alpaca.py run (ckpt.pt, no Hugging Face
    config.json), which --init_from takes as it takes GPT-2's name or a Hugging Face folder."""
    return bool(path) and os.path.isfile(os.path.join(path, "ckpt.pt")) and not os.path.isfile(
        os.path.join(path, "config.json"))


def model_class(cfg):
    """GPT, or ChunkedLossGPT where the settings ask for the chunked loss: the same weights either way."""
    return speed.ChunkedLossGPT if cfg.get("chunked_loss") else GPT


def model_from_checkpoint(ckpt, cfg=None, every_process=False):
    """The trained model of a checkpoint (with its adapters, if it has any), on the CPU. cfg, when
    given, is a run's settings: its dropout and lora_dropout replace the saved ones. Under torchrun
    only rank 0 reads the weights, which checkpoints.restore broadcasts to the others' models when
    a run resumes; every_process: each reads them (a new run that starts from them)."""
    if "model" not in ckpt:  # finetune_alpaca.py keeps a LoRA run's adapters alone
        fail(f"this checkpoint holds LoRA adapters only: load them with --init_from={ckpt['config']['init_from']} "
             f"--adapter=<its out_dir>")
    args, settings = ckpt["model_args"], ckpt["config"]
    if cfg is not None:
        args = {**args, "dropout": cfg["dropout"]}
        settings = {**settings, "lora_dropout": cfg.get("lora_dropout", settings.get("lora_dropout"))}
    model = add_adapters(model_class(cfg or {})(GPTConfig(**args)), settings)
    if every_process or not dist.is_initialized() or dist.get_rank() == 0:
        model.load_state_dict(ckpt["model"])
    return model


def build_model(c, vocab_size, ckpt):
    """The model to train: the checkpoint's, a fresh one, or GPT-2's weights."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, vars(c))
    elif c.init_from == "scratch":
        torch.manual_seed(c.seed)  # the same initial weights in every process
        try:
            model = model_class(vars(c))(GPTConfig(block_size=c.block_size, vocab_size=vocab_size, n_layer=c.n_layer,
                                                   n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias,
                                                   pos_emb=c.pos_emb, mlp=c.mlp))
        except ValueError as e:
            fail(str(e))
    elif run_dir(c.init_from):  # a new run that starts from another run's weights
        source = checkpoints.load(os.path.join(c.init_from, "ckpt.pt"))
        model = merge_and_unload(model_from_checkpoint(source, vars(c), every_process=True))
        print(f"note: a new run from the weights of {c.init_from}; to go on with that run instead, use "
              f"--init_from=resume --out_dir={c.init_from}", file=sys.stderr)
    else:
        try:
            model = model_class(vars(c)).from_pretrained(c.init_from, dropout=c.dropout)
        except (ValueError, FileNotFoundError, DownloadError) as e:
            fail(f"--init_from={c.init_from}: {e}")
    if ckpt is None:
        try:
            add_adapters(model, vars(c))
        except ValueError as e:
            fail(f"--lora_rank={c.lora_rank}: {e}")
    if vocab_size > model.config.vocab_size:
        fail(f"the dataset's vocabulary ({vocab_size}) is larger than the model's ({model.config.vocab_size})")
    return model


def load_model(cfg):
    """The model to sample from or training.evaluate, and the name of its tokenizer, from the settings
    init_from (a gpt2* name, a local HF directory, resume: out_dir/ckpt.pt, or "": gpt2 or the
    adapter's base), adapter and tokenizer. On the CPU."""
    if cfg["init_from"] == "resume" or run_dir(cfg["init_from"]):  # a train.py run or a full fine-tune
        if cfg["adapter"]:
            fail(f"--adapter goes with a base model (--init_from=gpt2, ...), not with --init_from={cfg['init_from']}")
        folder = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
        ckpt = checkpoints.load(os.path.join(folder, "ckpt.pt"))
        return model_from_checkpoint(ckpt), ckpt["tokenizer"]
    adapter_error = f"cannot load the adapter in {cfg['adapter']}"
    try:
        base = read_adapter_config(cfg["adapter"])["base_model"] if cfg["adapter"] else "gpt2"
    except (OSError, ValueError) as e:
        fail(f"{adapter_error}: {e}")
    name = cfg["init_from"] or base
    try:
        model = (model_from_checkpoint(checkpoints.load(os.path.join(name, "ckpt.pt"))) if run_dir(name) else
                 GPT.from_pretrained(name))
    except (ValueError, FileNotFoundError, DownloadError) as e:
        named = "" if cfg["init_from"] else f" (the base model that {cfg['adapter']}/adapter.json names)"
        fail(f"{e}{named}")
    if cfg["adapter"]:
        try:
            load_adapter(model, cfg["adapter"])
        except (OSError, ValueError) as e:
            fail(f"{adapter_error}: {e}")
    if cfg["init_from"] and cfg["adapter"] and base != cfg["init_from"]:
        print(f"note: the adapter was trained on {base}, it is applied to {cfg['init_from']}", file=sys.stderr)
    return model, cfg["tokenizer"]


def known_tokenizer(cfg, recorded=""):
    """The tokenizer the model was trained with, where that is known: recorded in its checkpoint, or
    gpt2 for GPT-2's weights and for an adapter (finetune_alpaca.py trains on gpt2's tokens). A local
    HF directory records none (a model trained here with another tokenizer may be saved as one):
    None, and --tokenizer names it. A --tokenizer that differs from the known one is refused."""
    if cfg["init_from"] == "resume" or run_dir(cfg["init_from"]):  # a checkpoint records it
        known = recorded
    else:
        known = None if os.path.isdir(cfg["init_from"]) and not cfg["adapter"] else "gpt2"
    if known and cfg["tokenizer"] not in ("", known):
        fail(f"--tokenizer={cfg['tokenizer']} is not this model's: it was trained with {known}; leave --tokenizer out")
    return known
