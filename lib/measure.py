"""Measurements of a run: FLOPs per token, the matmul peak behind MFU, peak memory, the step clock."""
import sys
import time

import torch


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


def duration(seconds):
    """A length of time as a person says it: 42 s, 7 min 5 s, 3 h 12 min, 2 d 4 h."""
    seconds = round(seconds)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size} {unit} {seconds % size // smaller_size} {smaller}"
    return f"{seconds} s"


class Clock:
    """Seconds per training iteration between two log lines, evaluations left out."""

    def __init__(self, it):
        self.eval_seconds = 0.0
        self.restart(it)

    def restart(self, it, paused_since=None):
        """Count from now, iteration it being the next. paused_since: when the evaluation that
        stopped the clock began; its length is kept, for the run's estimate."""
        now = time.perf_counter()
        if paused_since is not None:
            self.eval_seconds = now - paused_since
        self.start, self.it = now, it

    def lap(self, it):
        """Seconds per iteration since the last lap or restart, iteration it included; the next lap
        counts from here."""
        now = time.perf_counter()
        seconds = (now - self.start) / (it + 1 - self.it)
        self.start, self.it = now, it + 1
        return seconds
