"""lib/speed.py's fast forms against gpt.py's plain ones: the chunked loss against F.cross_entropy
over every logit, and half-precision weights against float32."""
import pytest
import torch

import gpt
from gpt import GPT, GPTConfig
from lib import speed
from test_model import VARIANTS, batch, tiny_gpt


def cross_entropy_and_grads(model, x, y, chunked, dtype=None):
    """The loss and every parameter's gradient, from ChunkedLossGPT's forward (chunked) or from
    GPT's, which takes F.cross_entropy over every logit at once."""
    model.zero_grad(set_to_none=True)
    forward = speed.ChunkedLossGPT.forward if chunked else GPT.forward
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = forward(model, x, y)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(monkeypatch):
    """GPT-2's vocabulary and 2 x 200 rows: chunks of 2**24 // 50257 = 333 rows rounded down to 320;
    masked targets included. float32: equal within rounding; bfloat16 autocast: as close as two
    bfloat16 computations of the same thing."""
    model = GPT(GPTConfig(block_size=200, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    chunks = []
    mm = torch.mm
    x, y = batch(50257, B=2, T=200, seed=3), batch(50257, B=2, T=200, seed=4)
    y[0, :30] = -100
    loss, grads = cross_entropy_and_grads(model, x, y, chunked=False)
    monkeypatch.setattr(torch, "mm", lambda a, b, **out: chunks.append(a.shape) or mm(a, b, **out))
    ours, our_grads = cross_entropy_and_grads(model, x, y, chunked=True)
    assert [shape[0] for shape in chunks if shape[-1] == 16] == [320, 80]  # the logits, a chunk at a time
    assert grads.keys() == our_grads.keys() and "transformer.wte.weight" in grads
    assert abs(ours - loss) <= 1e-5
    for name, g in grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    monkeypatch.setattr(torch, "mm", mm)
    loss, grads = cross_entropy_and_grads(model, x, y, chunked=False, dtype=torch.bfloat16)
    ours, our_grads = cross_entropy_and_grads(model, x, y, chunked=True, dtype=torch.bfloat16)
    assert abs(ours - loss) <= 1e-3
    for name, g in grads.items():
        assert (our_grads[name] - g).norm() <= 0.02 * g.norm(), name


def test_chunked_loss_skips_the_gradients_nobody_needs(monkeypatch):
    """No gradients under no_grad, and none for a frozen tied matrix (LoRA trains with it frozen):
    the loss is the same, and h's gradient is still right. The loss's matrix products are counted:
    the logits alone under no_grad, the logits and h's gradient with the matrix frozen."""
    model = tiny_gpt(seed=5)
    x, y = batch(B=2, T=16, seed=6), batch(B=2, T=16, seed=7)
    products, mm, addmm_ = [], torch.mm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda a, b, **out: products.append("mm") or mm(a, b, **out))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda t, a, b: products.append("addmm_") or addmm_(t, a, b))
    with torch.no_grad():
        quiet = speed.ChunkedLossGPT.forward(model, x, y)[1]
    assert products == ["mm"]  # one chunk's logits
    assert not quiet.requires_grad and torch.equal(quiet, cross_entropy_and_grads(model, x, y, chunked=True)[0])
    products.clear()
    model.transformer.wte.weight.requires_grad_(False)
    loss, grads = cross_entropy_and_grads(model, x, y, chunked=False)
    ours, our_grads = cross_entropy_and_grads(model, x, y, chunked=True)
    assert products == ["mm", "mm"]  # the logits and h's gradient; the float32 matrix's would be addmm_
    assert "transformer.wte.weight" not in our_grads and grads.keys() == our_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['pos_emb']}-{v['mlp']}")
def test_cast_for_inference_keeps_norms_and_buffers_and_matches_float32(variant):
    model = tiny_gpt(seed=23, **variant)
    cast = speed.cast_for_inference(tiny_gpt(seed=23, **variant), torch.bfloat16)
    for name, p in cast.named_parameters():
        assert p.dtype == (torch.float32 if ".ln_" in name or name.startswith("transformer.ln_f") else torch.bfloat16), name
    assert cast.lm_head.weight is cast.transformer.wte.weight  # still one matrix
    assert all(b.dtype == torch.float32 for b in cast.buffers())  # rope tables
    x = batch()
    with torch.no_grad():
        exact = model(x)[0]
        with torch.autocast("cpu", torch.bfloat16):
            autocast_only = model(x)[0].float()
            ours = cast(x)[0].float()
    # bfloat16 keeps 8 bits of mantissa: both ways are as far from float32 as bfloat16 rounding puts them
    scale = exact.abs().max()
    assert (ours - exact).abs().max() < 0.05 * scale
    assert (ours - exact).abs().max() < 2 * (autocast_only - exact).abs().max() + 1e-3 * scale
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_cast_for_inference_on_qlora_keeps_the_nf4_codes():
    model = tiny_gpt(seed=29, n_embd=64)
    gpt.quantize_model(model)
    gpt.apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)  # an adapter that changes something
    x = batch()
    with torch.no_grad():
        exact = model(x)[0]
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        speed.cast_for_inference(model, torch.bfloat16)
        assert all(torch.equal(b, buffers[name]) and b.dtype == buffers[name].dtype for name, b in model.named_buffers())
        assert all(p.dtype == torch.bfloat16 for name, p in model.named_parameters() if "lora_" in name)
        with torch.autocast("cpu", torch.bfloat16):
            ours = model(x)[0].float()
    assert (ours - exact).abs().max() < 0.05 * exact.abs().max()


def test_chunked_loss_gpt_shares_gpt_s_state_dict_and_logits():
    """ChunkedLossGPT is GPT with another loss: the same keys load either way, the same logits
    without targets, the same loss with them, and no logits returned beside it."""
    model = tiny_gpt(seed=41)
    fast = speed.ChunkedLossGPT(model.config)
    fast.load_state_dict(model.state_dict())
    x, y = batch(seed=42), batch(seed=43)
    with torch.no_grad():
        logits, loss = model(x, y)
        fast_logits, fast_loss = fast(x, y)
        assert fast_logits is None
        assert torch.equal(fast(x)[0], model(x)[0])
    assert abs(fast_loss - loss) <= 1e-5
    assert fast.state_dict().keys() == model.state_dict().keys()


FAULTS = """
import resource, sys, torch
from lib import speed
done = speed.keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    buffer = torch.empty(2**25)  # 128 MiB, as a step's logits are allocated afresh each step
    buffer.fill_(1.0)
    del buffer
print(done, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_spares_the_page_faults_of_fresh_buffers():
    """Six 128 MiB buffers in a row: glibc maps each afresh and faults in its 32768 pages again,
    unless told to keep freed memory, when the first buffer's pages serve all six. An allocator
    setting given in the environment wins over ours."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode, **extra):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=root,
                             env={**env, **extra}, check=True).stdout.split()
        return out[0], int(out[1])
    pages = 2**25 * 4 // 4096
    plain, kept = faults("plain"), faults("keep")
    assert plain[1] > 5 * pages and kept == ("True", kept[1]) and kept[1] < plain[1] / 2  # at most 3 of 6 buffers' pages
    assert faults("keep", MALLOC_TOP_PAD_="0")[0] == "False"
