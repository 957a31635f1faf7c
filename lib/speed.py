"""Speed kept out of gpt.py's way, each fast form proven equal to gpt.py's plain one by a test.

A loss that never holds all the logits at once (ChunkedLossGPT), weights in half precision for
inference, and an allocator setting that spares a CPU run the page faults of fresh buffers.
"""
import ctypes
import os

import torch
import torch.nn as nn

from gpt import GPT

def logit_chunks(h, weight):
    """The logits h @ weight.T (h (N, C) and weight (V, C) in the matmuls' dtype) a chunk of rows at
    a time, so that the (N, V) logits never exist whole: for 8 x 256 tokens and GPT-2's vocabulary
    they are 412 MB in float32. Yields (the rows, a slice; their logits in float32 (n, V); the same
    logits in the matmuls' dtype, the same tensor when that is float32). Some 16M logits a chunk
    (64 MB in float32), the rows a multiple of 64, which BLAS tiles evenly. The logits are views of
    buffers that the next chunk overwrites (fresh tensors each chunk would cost more in page faults
    than the softmax): use them, or overwrite them, before the next one."""
    n = max(64, 2 ** 24 // weight.size(0) // 64 * 64)  # rows a chunk
    buffer = torch.empty(min(n, h.size(0)), weight.size(0), dtype=torch.float32, device=h.device)
    buffer_low = buffer if h.dtype == torch.float32 else torch.empty_like(buffer, dtype=h.dtype)
    for start in range(0, h.size(0), n):
        rows = slice(start, min(start + n, h.size(0)))
        logits, logits_low = buffer[:rows.stop - start], buffer_low[:rows.stop - start]
        torch.mm(h[rows], weight.t(), out=logits_low)
        if logits_low is not logits:
            logits.copy_(logits_low)
        yield rows, logits, logits_low


def exp_shifted_(logits):
    """Each row of float32 logits (n, V) becomes exp(logit - the row's largest), in place; returns
    (the largest, the sum of the exps), (n, 1) each: the row's log-sum-exp is largest + log(sum)
    and its softmax exp / sum, with no overflow."""
    largest = logits.amax(dim=-1, keepdim=True)
    return largest, logits.sub_(largest).exp_().sum(dim=-1, keepdim=True)


class LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of the logits h @ weight.T against targets (-100: not scored), a chunk
    at a time from logit_chunks, because a log-softmax over all the logits, its backward pass and a
    zero-filled gradient would each sweep 412 MB at 8 x 256 tokens. While a chunk's logits are at
    hand, the forward pass also computes the gradients of h and weight; the backward pass only
    scales them. In bfloat16 that takes two more buffers of the weight's shape (bfloat16 and
    float32: 231 MB for GPT-2) beside its float32 gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        # h (N, C), weight (V, C), targets (N,); the matmuls in autocast's dtype, the softmax in float32
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        scored = targets != -100
        classes = targets.clamp(min=0)[:, None]  # any class for the rows not scored: they weigh 0
        weights = (scored / scored.sum())[:, None]  # each scored row's share of the mean, (N, 1)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hc) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        product = product32 = None  # a chunk's product in the matmuls' dtype, and a float32 copy of it:
        if need_w and dtype != torch.float32:  # adding the copy to grad_w is faster than adding the product
            product, product32 = torch.empty_like(wc), torch.empty_like(grad_w)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows, logits, logits_low in logit_chunks(hc, wc):
            target = logits.gather(1, classes[rows])  # (n, 1)
            largest, total = exp_shifted_(logits)
            loss += ((largest + total.log() - target) * weights[rows]).sum()  # log-sum-exp minus the target's logit
            if need_h or need_w:  # d loss / d logits = (softmax - one_hot) * the row's weight:
                # (exp - total at the target) / total, the exps being those exp_shifted_ left
                grad = logits.scatter_add_(1, classes[rows], -total).mul_(weights[rows] / total)
                if logits_low is not logits:
                    grad = logits_low.copy_(grad)
                if need_h:
                    torch.mm(grad, wc, out=grad_h[rows])
                if need_w:  # summed in float32, in place where the product is float32 too
                    if dtype == torch.float32:
                        grad_w.addmm_(grad.t(), hc[rows])
                    else:
                        grad_w += product32.copy_(torch.mm(grad.t(), hc[rows], out=product))
        ctx.dtypes = h.dtype, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else (grad_h * grad_loss).to(ctx.dtypes[0]),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.dtypes[1]), None)


def linear_cross_entropy(h, weight, targets):
    """LinearCrossEntropy of h (N, C), weight (V, C) and targets (N,), with no gradient computed
    under torch.no_grad: inside a Function only requires_grad says which gradients are wanted, and
    a parameter requires grad in evaluation too, where its gradient would cost a third more work."""
    if not torch.is_grad_enabled():
        h, weight = h.detach(), weight.detach()
    return LinearCrossEntropy.apply(h, weight, targets)


class ChunkedLossGPT(GPT):
    """GPT whose forward, given targets, returns (None, the loss) computed by linear_cross_entropy:
    the same loss and gradients as GPT's F.cross_entropy over the logits, without the (B, T,
    vocab_size) logits. The same parameters and state dict as GPT, so either class loads the
    other's checkpoints; the loss is computed inside forward, where DDP's and FSDP's hooks run."""

    def forward(self, idx, targets=None):
        if targets is None:
            return super().forward(idx)
        h = self.hidden_states(idx)  # (B, T, n_embd)
        return None, linear_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1))


def cast_for_inference(model, dtype):
    """Store every parameter but the norms' in dtype (torch.bfloat16 or torch.float16), in place,
    to run under autocast to that dtype. Decoding a token reads every weight once, so half the
    bytes is close to twice the speed; autocast over float32 weights would instead read each
    float32 weight and write a copy in every forward pass. The norms (few numbers, and sensitive
    ones) and the buffers (rope tables, NF4's codes and scales) stay as they are."""
    for module in model.modules():
        if not isinstance(module, nn.LayerNorm):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)  # .data keeps the tied wte / lm_head one parameter
    return model


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for the next allocation instead of handing it back
    to the kernel. By default a buffer over 32 MB is mapped fresh and unmapped when freed, so each
    step's logits and activations (412 MB of logits alone at 8 x 256 tokens and GPT-2's
    vocabulary) fault in every page again: a tenth of a CPU step. The same as starting Python with
    MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ set; those, when given,
    win. Returns whether the setting was made (not on macOS or musl, whose allocators differ)."""
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
    settings = ((M_MMAP_THRESHOLD, 2**31 - 1), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30))
    return all(mallopt(option, value) == 1 for option, value in settings)
