"""Checkpoints and exact resume: written atomically, read without running code, restored on any number of processes."""
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from lib import logs
from lib.cli import configure, fail
from lib.files import atomic_write


class _WriteErrors:
    """A file that keeps the OSError of a failed write, which torch.save reports only as an
    unexplained RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save(path, state, resume=""):
    """torch.save to a temporary file, fsync, rename: killed at any moment, even by SIGKILL, the
    previous checkpoint stays whole. state holds only tensors and plain Python values. A file that
    cannot be written (a full disk, a folder made read-only) stops the run with one line saying
    why, and resume, the command that goes on from the last checkpoint."""
    recorded = None
    try:
        with atomic_write(path) as f:
            recorded = _WriteErrors(f)
            torch.save(state, recorded)
    except (OSError, RuntimeError) as e:
        cause = recorded.error if isinstance(e, RuntimeError) and recorded and recorded.error else e
        if not isinstance(cause, OSError):
            raise
        fail(f"cannot write the checkpoint {path}: {cause.strerror or cause}; the last one written is whole: make "
             f"room or fix the folder, then resume{' with: ' + resume if resume else ''}")


def load(path):
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
    if not isinstance(ckpt.get("model_args"), dict):
        fail(f"{path} does not record its model's shape (model_args): it was not written by train.py or "
             f"finetune_alpaca.py; start a new run with another --out_dir")
    return ckpt


def state_dicts():
    """torch's state-dict functions for DDP and FSDP, imported on first use: the import takes
    0.6 s, which sample.py, eval.py and export.py, never saving a run, need not wait for."""
    from torch.distributed.checkpoint import state_dict
    return state_dict


def full_model_state(model):
    """The model's state dict, whole, on the CPU of rank 0 (see full_state)."""
    sd = state_dicts()
    return sd.get_model_state_dict(model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(model, optimizer, trainable_only=False):
    """(model, optimizer) state dicts, whole, on the CPU of rank 0 (empty elsewhere), whether the
    run is one process, DDP or FSDP: every process calls it, FSDP's shards are processes.gathered. The
    optimizer's state is keyed by parameter name, so a run split another way can load it.
    trainable_only: the model's trainable parameters alone (a LoRA run's adapters)."""
    sd = state_dicts()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_state = sd.get_model_state_dict(model, options=options)
    if trainable_only:  # the frozen embedding's tied twin, lm_head.weight, is not left out by the option
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {name: t for name, t in model_state.items() if name in trainable}
    full = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return model_state, sd.get_optimizer_state_dict(model, optimizer, options=full)


def run_state(optimizer_state, scaler, it, best_val_loss, cfg, model, tokenizer, log_path, *, script, world_size,
              evaluated=True):
    """What a checkpoint holds besides the weights: all it takes to go on exactly where it was
    written, on any number of processes. evaluated: whether iteration it's evaluation (if it has
    one) is done; a run stopped by a signal writes its checkpoint before it."""
    return {"optimizer": optimizer_state, "scaler": scaler.state_dict(), "iter": it,
            "best_val_loss": best_val_loss, "config": cfg, "model_args": asdict(model.config),
            "tokenizer": tokenizer, "log_bytes": os.path.getsize(log_path), "script": script,
            "world_size": world_size, "evaluated": evaluated}


def restore(ckpt, model, optimizer, scaler, log_path, write_files=True):
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
    sd = state_dicts()
    options = sd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    if distributed and "model" in ckpt:  # not in a LoRA fine-tune's: every process read its few MB of adapters
        sd.set_model_state_dict(model, ckpt["model"] if reads else {}, options=options)
    sd.set_optimizer_state_dict(model, optimizer, ckpt["optimizer"] if reads else {}, options=options)
    if ckpt["scaler"]:  # empty when saved without float16
        scaler.load_state_dict(ckpt["scaler"])
    if write_files:
        logs.truncate_log(log_path, ckpt["log_bytes"])
    return ckpt["iter"], ckpt["best_val_loss"]


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
    ckpt = load(ckpt_path)
    script = os.path.basename(source)
    if ckpt.get("script", script) != script:
        fail(f"{ckpt_path} was written by {ckpt['script']}: resume it with `python {ckpt['script']} "
             f"--init_from=resume --out_dir={cfg['out_dir']}`, or give {script} another --out_dir")
    saved = {k: ckpt["config"].get(k, v) for k, v in defaults.items()}
    cfg = configure(saved, argv, doc=doc, source=source)
    changed = [k for k in fixed_keys if cfg[k] != saved[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r}" if k in ckpt["config"] else f"{k} unrecorded" for k in changed)
        fail(f"{ckpt_path} was trained with {was}; resuming cannot change that to "
             f"{', '.join(f'{k}={cfg[k]!r}' for k in changed)} (use a new --out_dir)")
    return cfg, ckpt
