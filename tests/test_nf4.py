"""NF4 quantization and QLoRA in gpt.py, against the QLoRA paper's table and figures, a naive int4
baseline, and recomputations by hand."""
import pytest
import torch
import torch.nn.functional as F

import gpt
from lib import weightfiles
from gpt import GPT, GPTConfig

# Appendix E of Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
CONFIG = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=64)


def normal_weight(shape=(256, 192), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def int4_absmax(w, block=64):
    """The naive baseline: 15 evenly spaced levels, round(w / absmax * 7), per block of 64."""
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return (torch.round(blocks / absmax * 7) / 7 * absmax).view(w.shape)


def test_levels_are_the_papers_table():
    torch.testing.assert_close(gpt.NF4_LEVELS, torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)
    assert gpt.NF4_LEVELS.dtype == torch.float32 and gpt.NF4_LEVELS[7] == 0


def test_codes_pack_two_per_byte_high_nibble_first():
    w = torch.tensor(PAPER_NF4 * 8).view(2, 64)  # every level, so absmax is 1 and the codes are 0..15
    q = gpt.nf4_quantize(w, double_quant=False)
    assert q["packed"].dtype == torch.uint8 and q["packed"].numel() == 64
    assert q["packed"][:8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    torch.testing.assert_close(q["absmax"], torch.ones(2))
    torch.testing.assert_close(gpt.nf4_dequantize(q, w.shape), gpt.NF4_LEVELS.repeat(8).view(2, 64), rtol=0, atol=0)


def test_every_weight_goes_to_its_nearest_level():
    w = normal_weight()
    q = gpt.nf4_quantize(w, double_quant=False)
    absmax = w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(PAPER_NF4)
    nearest = levels[(w.view(-1, 64, 1) / absmax[..., None] - levels).abs().argmin(dim=-1)] * absmax
    torch.testing.assert_close(gpt.nf4_dequantize(q, w.shape), nearest.view(w.shape), rtol=0, atol=1e-7)


def test_error_is_bounded_and_beats_naive_int4():
    w = normal_weight()
    absmax = w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    half_gap = (torch.tensor(PAPER_NF4).diff().max() / 2).item()
    plain = gpt.nf4_dequantize(gpt.nf4_quantize(w, double_quant=False), w.shape)
    assert ((plain - w).view(-1, 64).abs() <= absmax * half_gap + 1e-7).all()
    nf4_error = (plain - w).pow(2).mean()
    int4_error = (int4_absmax(w) - w).pow(2).mean()
    assert nf4_error < 0.9 * int4_error
    double = gpt.nf4_dequantize(gpt.nf4_quantize(w, double_quant=True), w.shape)
    assert (double - w).pow(2).mean() < 1.01 * nf4_error  # the 8-bit scales cost next to nothing
    assert (double - plain).abs().max() < 0.01 * absmax.max()


def test_double_quantized_scales_are_8_bit_blockwise():
    w = normal_weight((512, 256))  # 2048 blocks of 64: 8 blocks of 256 scales
    q = gpt.nf4_quantize(w, double_quant=True)
    assert set(q) == {"packed", "absmax_q", "absmax_scale", "absmax_mean"}
    assert q["absmax_q"].dtype == torch.int8 and q["absmax_q"].numel() == 2048
    assert q["absmax_scale"].shape == (8,) and q["absmax_mean"].shape == ()
    absmax = w.view(-1, 64).abs().amax(dim=1)
    torch.testing.assert_close(q["absmax_mean"], absmax.mean())
    centred = (absmax - absmax.mean()).view(8, 256)
    torch.testing.assert_close(q["absmax_scale"], centred.abs().amax(dim=1) / 127)
    assert q["absmax_q"].abs().max() == 127


def test_packed_size_matches_bits_per_parameter():
    w = normal_weight((1024, 1024))
    n = w.numel()
    with_dq = gpt.nf4_quantize(w, double_quant=True)
    nbytes = sum(t.numel() * t.element_size() for t in with_dq.values())
    assert nbytes == n // 2 + n // 64 + 4 * n // (64 * 256) + 4  # codes, 8-bit scales, their scales, the mean
    assert gpt.nf4_bits_per_param(with_dq, n) == pytest.approx(4.127, abs=5e-4)  # the paper's figure
    assert gpt.nf4_bits_per_param(gpt.nf4_quantize(w, double_quant=False), n) == 4.5


def test_odd_shapes_and_zero_blocks_survive():
    w = torch.zeros(7, 13)
    w[0, :5] = torch.tensor([0.5, -1.0, 0.25, 0.0, 2.0])
    for double_quant in (False, True):
        out = gpt.nf4_dequantize(gpt.nf4_quantize(w, double_quant), w.shape)
        assert out.shape == w.shape and torch.isfinite(out).all()
        assert (out[1:] == 0).all() and out[0, 4] == pytest.approx(2.0, rel=1e-2)


def test_nf4_linear_matches_its_dequantized_weight_and_trains_nothing():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    layer = gpt.NF4Linear(linear)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]  # the weight is buffers only
    assert set(dict(layer.named_buffers())) == {"packed", "absmax_q", "absmax_scale", "absmax_mean"}
    weight = gpt.nf4_dequantize(gpt.nf4_quantize(linear.weight), (96, 64))
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, weight, linear.bias)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 64)).dtype == torch.bfloat16


def qlora_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIG))
    gpt.quantize_model(model)
    return gpt.apply_lora(model, rank=8, alpha=16)


def test_quantize_model_replaces_block_linears_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    dense_bytes = sum(p.numel() * 4 for p in model.transformer.h.parameters())
    n_params = model.num_params()
    gpt.quantize_model(model)
    assert model.num_params() == n_params  # 4-bit weights are buffers, still counted
    for block in model.transformer.h:
        for path in gpt.BLOCK_LINEARS:
            assert isinstance(block.get_submodule(path), gpt.NF4Linear)
    assert type(model.lm_head) is torch.nn.Linear
    quantized_bytes = sum(t.numel() * t.element_size() for t in [*model.transformer.h.parameters(),
                                                                 *model.transformer.h.buffers()])
    assert quantized_bytes < dense_bytes / 5
    with pytest.raises(ValueError, match="once"):
        gpt.quantize_model(model)


def test_qlora_training_lowers_the_loss():
    model = qlora_model().train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.endswith(gpt.LORA_SUFFIXES) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, CONFIG["vocab_size"], (4, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for name, b in model.named_buffers():  # the 4-bit weights never moved
        assert torch.equal(b, buffers[name]), name


def test_merge_into_nf4_requantizes(tmp_path):
    model = qlora_model().eval()
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    unadapted = model(idx)[0]
    with torch.no_grad():
        for layer in gpt.lora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
    adapted = model(idx)[0]
    layer = model.transformer.h[0].mlp.c_fc
    expected = layer.base.dequantize() + layer.delta()
    gpt.merge_lora(model)
    assert layer.base.packed.dtype == torch.uint8  # still 4-bit
    expected_q = gpt.nf4_dequantize(gpt.nf4_quantize(expected), expected.shape)
    torch.testing.assert_close(layer.base.dequantize(), expected_q)
    merged = model(idx)[0]
    assert (merged - adapted).abs().mean() < 0.5 * (unadapted - adapted).abs().mean()  # the update is in
    with pytest.raises(RuntimeError):
        gpt.merge_lora(model)


def test_qlora_adapter_round_trip(tmp_path):
    model = qlora_model().eval()
    with torch.no_grad():
        for layer in gpt.lora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
    gpt.save_adapter(model, tmp_path, base_model="tiny")
    names = weightfiles.read_safetensors(tmp_path / "adapter.safetensors")
    assert all(n.endswith(gpt.LORA_SUFFIXES) for n in names)
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(**CONFIG)).eval()
    config = gpt.load_adapter(fresh, tmp_path)
    assert config["quantize"] == "nf4" and config["double_quant"] is True
    assert isinstance(fresh.transformer.h[1].attn.c_proj.base, gpt.NF4Linear)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="4-bit weights"):
        fresh.save_pretrained(tmp_path / "quantized")
    plain = gpt.merge_and_unload(fresh)  # a QLoRA model exports as a float GPT
    assert all(type(plain.transformer.h[0].get_submodule(p)) is torch.nn.Linear for p in gpt.BLOCK_LINEARS)
    torch.testing.assert_close(plain(idx)[0], model(idx)[0], rtol=0, atol=1e-4)
