"""The run's log: a JSON line per step or evaluation, the printed lines, and the plot drawn from the log."""
import importlib.util
import json
import os
import sys

from lib.benchmarks import TASKS
from lib.cli import fail
from lib.files import atomic_write
from lib.measure import duration


def warn(what, path, error):
    """A log or a plot that could not be written: one line, and training goes on, as the
    checkpoints hold all it needs."""
    print(f"warning: could not write {what} {path}: {error.strerror or error}; training goes on", file=sys.stderr)


def log_record(path, record, wandb_run=None):
    """Append one JSON line to the log (and send the numbers to Weights & Biases)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        warn("the log", path, e)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["iter"])


def log_step(path, record, wandb_run=None):
    """Print a training step's line and log its record: loss, lr, time, tokens/s, MFU (train.py
    only) and peak memory."""
    mfu = f", MFU {100 * record['mfu']:.2f}%" if "mfu" in record else ""
    print(f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['ms']:.1f} ms/iter, "
          f"{record['tokens_per_s']:,.0f} tokens/s{mfu}, mem {record['mem']:,.0f} MB", flush=True)
    log_record(path, record, wandb_run)


def log_estimate(path, it, seconds_per_step, tokens_per_step, steps_left, evals_left, eval_seconds, wandb_run=None):
    """Once the first steps are timed: the run's throughput and the time it has left, its
    evaluations included, printed and logged."""
    steps, evals = seconds_per_step * steps_left, eval_seconds * evals_left
    record = {"iter": it, "estimated_tokens_per_s": tokens_per_step / seconds_per_step,
              "estimated_seconds_left": steps + evals}
    print(f"estimate: {record['estimated_tokens_per_s']:,.0f} tokens/s; {steps_left:,} steps left take "
          f"{duration(steps)}, {evals_left} evaluations {duration(evals)}: about {duration(steps + evals)} in all",
          flush=True)
    log_record(path, record, wandb_run)


def done_line(start_iter, max_iters, ckpt_path, log_path):
    """The last line of a run: what it did, or that a resumed one had nothing left to do."""
    if start_iter >= max_iters > 0:
        return (f"nothing to do: the run in {ckpt_path} had reached iteration {start_iter} already, and --max_iters="
                f"{max_iters}; give a larger --max_iters to train on")
    return f"done: {max_iters} iterations; checkpoint in {ckpt_path}, log in {log_path}"


def eval_line(it, losses, best_val_loss):
    return f"eval {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (best {best_val_loss:.4f})"


def log_eval(path, it, losses, best_val_loss, extra, wandb_run=None, printed=""):
    """An evaluation: its line printed (the losses, the scores among extra, then printed), its
    record logged with all of extra, and the plot beside the log redrawn."""
    shown = "".join(f", {k} {v:.4f}" for k, v in extra.items() if isinstance(v, float))
    print(f"{eval_line(it, losses, best_val_loss)}{shown}{printed}", flush=True)
    log_record(path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                      "best_val_loss": best_val_loss, **extra}, wandb_run)
    plot_log(path, os.path.join(os.path.dirname(path), "loss.png"))


def require_wandb():
    """--wandb_log=True needs the wandb package, which neither requirements file installs."""
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        fail("--wandb_log=True needs the wandb package, which the requirements leave out: pip install wandb "
             "(and wandb login), or leave --wandb_log out")


def start_wandb(project, name, cfg):
    """A Weights & Biases run that log_record sends the numbers to."""
    import wandb  # optional: only runs that log to it need it
    return wandb.init(project=project, name=name, config=cfg)


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
    try:
        with atomic_write(png_path) as f:
            fig.savefig(f, format="png", dpi=90)
    except OSError as e:
        warn("the plot", png_path, e)
