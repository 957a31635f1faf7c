"""--optimizer=muon: which tensors Muon and AdamW own, one step against a hand computation,
accumulation against a larger batch, exact resume, 2 DDP processes against 1, LoRA, and the
one-line refusals (FSDP, a change of optimizer on resume, a torch without Muon); compile."""
import copy
import io
import math

import numpy as np
import pytest
import torch

import finetune_alpaca
import train
from gpt import GPT, GPTConfig, apply_lora
from lib import checkpoints, processes, training
from test_finetune_alpaca import MODES, finetune, hub, log_without_timing  # noqa: F401 (a fixture)
from test_train import SPLITS, TINY, data_dir, losses, read_log, run  # noqa: F401 (a fixture)

SMALL = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the four matrices of a block


def owners(optimizer):
    """{id(parameter): "muon" or "adamw"} from the optimizers' own groups."""
    return {id(p): "muon" if isinstance(opt, torch.optim.Muon) else "adamw"
            for opt in optimizer for group in opt.param_groups for p in group["params"]}


@pytest.mark.parametrize("variant", ["gpt2", "rope_swiglu", "lora"])
def test_muon_owns_the_blocks_matrices_and_adamw_the_rest(variant):
    torch.manual_seed(0)
    extra = dict(pos_emb="rope", mlp="swiglu", bias=False) if variant == "rope_swiglu" else {}
    model = GPT(GPTConfig(**SMALL, **extra))
    if variant == "lora":
        apply_lora(model, 2, 4.0)
        matrices = {f"transformer.h.{i}.{lin}.lora_{ab}" for i in range(2) for lin in LINEARS for ab in "AB"}
    else:
        matrices = {f"transformer.h.{i}.{lin}.weight" for i in range(2) for lin in LINEARS}
    optimizer = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    assert [type(opt) for opt in optimizer] == [torch.optim.Muon] + [torch.optim.AdamW] * (variant != "lora")
    owner = owners(optimizer)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(owner) == sum(len(g["params"]) for g in optimizer.param_groups)  # no tensor in two groups
    assert {name for name, p in trainable.items() if owner.get(id(p)) == "muon"} == matrices
    assert {name for name, p in trainable.items() if owner.get(id(p)) == "adamw"} == set(trainable) - matrices
    assert set(owner) == {id(p) for p in trainable.values()}  # every trainable tensor, nothing frozen
    if variant != "lora":  # the tied output matrix is the embedding, with AdamW
        assert model.lm_head.weight is model.transformer.wte.weight and owner[id(model.lm_head.weight)] == "adamw"
        decay, no_decay = optimizer[1].param_groups
        assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu").__class__ is torch.optim.AdamW


def newton_schulz(g, steps=5):
    """Muon's orthogonalization written out, in float32: scale g to a spectral norm of at most 1
    (its Frobenius norm bounds it), then X <- aX + (b XX^T + c (XX^T)^2) X on the wide orientation
    (fewer rows than columns), which pushes every singular value towards 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_two_steps_equal_a_hand_computation():
    """Muon: momentum 0.95 (Nesterov), the orthogonalized update scaled by 0.2 sqrt(max(rows, cols)),
    decoupled weight decay; AdamW for the rest; both at the step's lr. Each step starts the hand
    computation from the weights the step started from. Muon orthogonalizes in bfloat16, which
    puts its update 3-9% (in norm) from the float32 one by hand here, measured; torch's default
    scale (20-60% off for these shapes) or no momentum (80-90% at the second step) would not pass.
    AdamW's updates match to float32's rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    hand = copy.deepcopy(model)
    optimizer = training.make_optimizer(model, 1.0, 0.1, (0.9, 0.95), "cpu", "muon")
    muon = {id(p) for p in optimizer[0].param_groups[0]["params"]}
    is_muon = {name: id(p) in muon for name, p in model.named_parameters()}
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    state = {name: {} for name in is_muon}
    for it, lr in enumerate((1e-2, 5e-3)):
        hand.load_state_dict(model.state_dict())
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        training.train_step(model, optimizer, training.make_scaler("cpu", "float32"), lambda *key: (x, y), it, lr,
                            grad_clip=0.0)
        hand.zero_grad()
        hand(x, y)[1].backward()
        with torch.no_grad():
            for name, p in hand.named_parameters():
                g, s = p.grad, state[name]
                if is_muon[name]:
                    s["buf"] = 0.95 * s.get("buf", torch.zeros_like(g)) + 0.05 * g
                    update = 0.2 * math.sqrt(max(p.shape)) * newton_schulz(0.05 * g + 0.95 * s["buf"])
                    decay = 0.1
                else:
                    s["m"] = 0.9 * s.get("m", torch.zeros_like(g)) + 0.1 * g
                    s["v"] = 0.95 * s.get("v", torch.zeros_like(g)) + 0.05 * g * g
                    m_hat, v_hat = s["m"] / (1 - 0.9 ** (it + 1)), s["v"] / (1 - 0.95 ** (it + 1))
                    update = m_hat / (v_hat.sqrt() + 1e-8)
                    decay = 0.1 if p.dim() == 2 else 0.0
                p.mul_(1 - lr * decay).sub_(lr * update)
        for (name, p), q in zip(model.named_parameters(), hand.parameters()):
            moved, by_hand = p.detach() - before[name], q.detach() - before[name]
            if is_muon[name]:
                assert (moved - by_hand).norm() < 0.12 * by_hand.norm(), (it, name)
            else:
                torch.testing.assert_close(moved, by_hand, rtol=1e-4, atol=1e-7, msg=f"{it} {name}")


def test_the_update_of_a_matrix_is_orthogonal_whatever_the_gradient_s_scale():
    """What makes Muon Muon: one step from zero momentum moves a matrix by lr x 0.2 sqrt(max(rows,
    cols)) x an (approximately) orthogonal matrix, singular values near 1, for a gradient of any size."""
    for scale in (1e-4, 1.0, 1e4):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.zeros(32, 64))
        w.grad = scale * torch.randn(32, 64)
        torch.optim.Muon([w], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
        singular = torch.linalg.svdvals(-w.detach() / (0.2 * math.sqrt(64)))
        assert singular.min() > 0.5 and singular.max() < 1.3, (scale, singular)


def test_accumulation_equals_a_larger_batch():
    """Two micro-batches of 4 against one batch of 8, with clipping: the same gradients up to
    float32's rounding, which can flip a bfloat16 rounding inside Muon's orthogonalization, so
    Muon's matrices agree to 3% of how far they moved (measured: under 1.5%), the rest to 2e-5."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    twice, start = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    one = training.make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    two = training.make_optimizer(twice, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    muon = {id(p) for p in one[0].param_groups[0]["params"]}
    scaler = training.make_scaler("cpu", "float32")
    for it in range(3):
        training.train_step(model, one, scaler, lambda *key: (x, y), it, 1e-2, grad_clip=0.5)
        training.train_step(twice, two, scaler, lambda split, it, i: (x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]), it,
                            1e-2, grad_accum=2, grad_clip=0.5)
    for (name, p), q, p0 in zip(model.named_parameters(), twice.parameters(), start.parameters()):
        moved = (p - p0).detach()
        assert moved.abs().max() > 1e-2, name  # every tensor moved, by far more than the tolerance
        if id(p) in muon:
            assert (q - p).norm() < 0.03 * moved.norm(), name
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=name)


def test_a_restored_optimizer_goes_on_bit_for_bit():
    """Through checkpoints.full_state, a file and checkpoints.restore: Muon's momentum and AdamW's
    moments come back, keyed by parameter name, and the next steps are the uninterrupted ones."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    optimizer = training.make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    scaler = training.make_scaler("cpu", "float32")
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for it in range(3):
        training.train_step(model, optimizer, scaler, lambda *key: (x, y), it, 1e-2)
    model_state, optimizer_state = checkpoints.full_state(model, optimizer)
    assert "momentum_buffer" in optimizer_state["state"]["transformer.h.0.attn.c_attn.weight"]
    assert "exp_avg" in optimizer_state["state"]["transformer.wte.weight"]
    f = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state}, f)
    f.seek(0)
    saved = torch.load(f, weights_only=True)
    resumed = GPT(GPTConfig(**SMALL))
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = training.make_optimizer(resumed, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    checkpoints.restore({**saved, "scaler": {}, "iter": 3, "best_val_loss": 1.0, "log_bytes": 0}, resumed,
                        resumed_optimizer, scaler, "unused.jsonl", write_files=False)
    for it in range(3, 6):
        a = training.train_step(model, optimizer, scaler, lambda *key: (x, y), it, 1e-2)
        b = training.train_step(resumed, resumed_optimizer, scaler, lambda *key: (x, y), it, 1e-2)
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_bfloat16_autocast_trains_with_muon():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    optimizer = training.make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    scaler = training.make_scaler("cpu", "bfloat16")
    first, *_, last = [training.train_step(model, optimizer, scaler, lambda *key: (x, y), it, 1e-2,
                                           dtype="bfloat16").item() for it in range(8)]
    assert last < first - 0.3


def test_a_float16_overflow_skips_the_steps_of_both_optimizers():
    """GradScaler takes MuonAdamW as one optimizer: gradients that overflow leave every weight as
    it was, Muon's and AdamW's; the scale then drops, and the next step moves them all."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    start = copy.deepcopy(model)
    optimizer = training.make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu", "muon")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows float32
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    training.train_step(model, optimizer, scaler, lambda *key: (x, y), 0, 1e-2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
    assert scaler.get_scale() < 2.0 ** 127
    scaler.update(2.0 ** 10)
    training.train_step(model, optimizer, scaler, lambda *key: (x, y), 1, 1e-2)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))


def fails(main, args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_torch_without_muon_is_one_line_naming_the_version(monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    err = fails(train.main, ["--optimizer=muon", "--device=cpu"], capsys)
    assert f"needs torch.optim.Muon, which came with torch 2.9, and this is torch {torch.__version__}" in err
    assert err.startswith("error: --optimizer=muon") and "--optimizer=adamw" in err


def test_resume_cannot_change_the_optimizer(data_dir, tmp_path, capsys):
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"])
    capsys.readouterr()
    err = fails(train.main, ["--init_from=resume", f"--out_dir={tmp_path}", "--optimizer=muon", "--max_iters=4"],
                capsys)
    assert "was trained with optimizer='adamw'; resuming cannot change that to optimizer='muon'" in err


@pytest.mark.slow
def test_a_compiled_model_trains_as_the_plain_one(data_dir, tmp_path, monkeypatch):
    compile_ = torch.compile  # the eager backend wraps the model as inductor does, without the C++ build
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    args = [*TINY, f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3", "--optimizer=muon"]
    train.main([*args, f"--out_dir={tmp_path / 'plain'}"])
    train.main([*args, f"--out_dir={tmp_path / 'compiled'}", "--compile=True"])
    np.testing.assert_allclose(losses(tmp_path / "compiled"), losses(tmp_path / "plain"), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_train_py_with_muon_resumes_exactly(data_dir, tmp_path):
    run([*SPLITS, "--optimizer=muon"], data_dir, tmp_path / "whole")
    run([*SPLITS, "--optimizer=muon", "--max_iters=5"], data_dir, tmp_path / "halves")
    run(["--init_from=resume", "--max_iters=10"], data_dir, tmp_path / "halves", tiny=False)
    whole, halves = read_log(tmp_path / "whole"), read_log(tmp_path / "halves")
    assert [(r["loss"], r["lr"]) for r in halves[0]] == [(r["loss"], r["lr"]) for r in whole[0]]  # to the bit
    assert [r["val_loss"] for r in halves[1]] == [r["val_loss"] for r in whole[1]]
    assert whole[1][-1]["val_loss"] < whole[1][0]["val_loss"] - 0.1


@pytest.mark.slow
def test_two_ddp_processes_equal_one_accumulating_twice_and_resume_on_one(data_dir, tmp_path):
    """Each process takes one of a step's two micro-batches; DDP averages the gradients, and every
    process orthogonalizes the same whole matrices. Stopped at iteration 5 and resumed on one
    process, the run goes on as one process would have."""
    run([*SPLITS, "--optimizer=muon", "--gradient_accumulation_steps=2"], data_dir, tmp_path / "one")
    result = run([*SPLITS, "--optimizer=muon"], data_dir, tmp_path / "two", nproc=2)
    assert "2 process(es) (DDP)" in result.stdout
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-4)
    run([*SPLITS, "--optimizer=muon", "--max_iters=5"], data_dir, tmp_path / "resumed", nproc=2)
    run(["--init_from=resume", "--max_iters=10"], data_dir, tmp_path / "resumed", tiny=False)
    np.testing.assert_allclose(losses(tmp_path / "resumed"), losses(tmp_path / "one"), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_lora_fine_tune_with_muon_trains_and_resumes_exactly(hub, tmp_path, monkeypatch):  # noqa: F811
    """Muon takes the adapters' A and B matrices, all that trains: there is no AdamW."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finetune(straight, *MODES["lora"], "--optimizer=muon")
    log = log_without_timing(straight / "log.jsonl")
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    real_step = training.train_step

    def stop_at_4(*args, **kwargs):
        if args[4] == 4:
            raise KeyboardInterrupt  # a crash after the checkpoint of iteration 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(stopped, *MODES["lora"], "--optimizer=muon")
    monkeypatch.setattr(training, "train_step", real_step)
    finetune_alpaca.main([f"--out_dir={stopped}", "--init_from=resume"])
    assert log_without_timing(stopped / "log.jsonl") == log  # bit for bit


def test_reaches_interpolates_between_evaluations():
    import bench
    assert bench.reaches([0, 40, 80], [10.0, 6.0, 5.0], 5.5) == 60  # halfway from 6.0 down to 5.0
    assert bench.reaches([0, 40, 80], [10.0, 6.0, 5.0], 6.0) == 40
    assert bench.reaches([0, 40, 80], [10.0, 6.0, 5.0], 4.0) is None
    assert bench.reaches([0, 40], [3.0, 2.0], 5.0) == 0


@pytest.mark.slow
def test_the_bench_section_trains_both_from_the_same_start_and_plots(data_dir, tmp_path, monkeypatch):
    """bench.py --only=optimizers at 4 steps on the toy data: both start from one model (the same
    loss at step 0, scored over the whole val split), both move, and the plot is written."""
    import bench
    (tmp_path / "data").symlink_to(data_dir)
    monkeypatch.chdir(tmp_path)
    rows = {what: value for what, value, _ in bench.bench_optimizers("toy", steps=4, seeds=2, eval_interval=2)}
    start = [v for what, v in rows.items() if what.startswith("held-out loss at step 0:")]
    end = [v for what, v in rows.items() if what.startswith("held-out loss at step 4:")]
    assert len(start) == 2 and start[0] == start[1] and all(loss < start[0] - 0.1 for loss in end)
    assert rows["Muon vs AdamW time per step (goal <= 1.15)"] > 0
    assert (tmp_path / "optimizers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["adamw", "muon", "lora"])
def test_the_start_up_line_counts_one_buffer_per_muon_weight_and_two_per_adamw_weight(variant):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    if variant == "lora":
        apply_lora(model, 2, 4.0)
    optimizer = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "adamw" if variant == "adamw" else "muon")
    line = processes.held_per_process(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("transformer.h.")
                   and p.dim() == 2) if variant != "adamw" else 0
    names = {"adamw": "AdamW", "muon": "Muon and AdamW", "lora": "Muon"}[variant]
    assert line.endswith(f", {names} state {4 * (2 * trainable - matrices) / 2 ** 20:,.1f} MiB"), line
