"""Every user mistake is one line on stderr and exit status 2, naming the setting at fault: a table
of bad inputs per script, run through each script's main() (and a sample of them as real
processes), each asserting the exit status, a single line, no traceback and the words it must say."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import finetune_alpaca
import prepare_data
import sample
import train
from conftest import ROOT
from lib import cli, datasets

transformers = pytest.importorskip("transformers")
VOCAB = 128


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A toy dataset, a tiny GPT-2 directory, an Alpaca file, and damaged versions of each kind of file."""
    root = tmp_path_factory.mktemp("mistakes")
    rng = np.random.default_rng(0)
    for name, meta in (("toy", {"tokenizer": "gpt2", "vocab_size": VOCAB}),
                       ("smallvocab", {"tokenizer": "gpt2", "vocab_size": VOCAB // 2}),
                       ("unrecorded", {"tokenizer": "gpt2", "vocab_size": VOCAB // 2}),
                       ("cl100k", {"tokenizer": "cl100k_base", "vocab_size": VOCAB}),
                       ("badvocab", {"tokenizer": "gpt2", "vocab_size": "abc"}),
                       ("negvocab", {"tokenizer": "gpt2", "vocab_size": -3}),
                       ("notoken", {"vocab_size": VOCAB}),
                       ("notjson", None)):
        (root / "data" / name).mkdir(parents=True)
        for split in ("train", "val"):
            datasets.write_tokens(root / "data" / name / f"{split}.bin", rng.integers(0, VOCAB, 3000), VOCAB)
        (root / "data" / name / "meta.json").write_text("{oops" if meta is None else json.dumps(meta))
    for split in ("train", "val"):  # as llm.c writes shards: no largest id in the header, so it is read from the ids
        with open(root / "data" / "unrecorded" / f"{split}.bin", "r+b") as f:
            f.seek(4 * datasets.ID_BOUND)
            f.write(bytes(4))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=256, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf")
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]
    (root / "alpaca.json").write_text(json.dumps(records))
    (root / "garbage").mkdir()
    (root / "garbage" / "ckpt.pt").write_bytes(os.urandom(4096))
    for script, other in (("train.py", "finetune_alpaca.py"), ("finetune_alpaca.py", "train.py")):
        (root / f"by-{script}").mkdir()
        torch.save({"iter": 5, "config": {"init_from": "gpt2"}, "model_args": {}, "script": script},
                   root / f"by-{script}" / "ckpt.pt")
    (root / "no-model-args").mkdir()
    torch.save({"iter": 5, "config": {"init_from": "gpt2"}, "script": "train.py"}, root / "no-model-args" / "ckpt.pt")
    (root / "syntax.py").write_text("batch_size = 4\nlearning_rate = (1e-3\n")
    (root / "raises.py").write_text("batch_size = 4\nlearning_rate = 1 / 0\n")
    (root / "none.py").write_text("batch_size = None\n")
    (root / "exits.py").write_text("batch_size = 4\nexit()\n")
    (root / "notpython.txt").write_text("hello")
    return root


def toy(root):
    return [f"--data_dir={root / 'data'}", "--dataset=toy", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=2", "--sample_prompt=A", "--device=cpu", "--dtype=float32",
            f"--out_dir={root / 'out-train'}"]


# (arguments, words the message must hold); {root} is the fixture's folder
TRAIN = [
    (["--grad_clip=-1"], "--grad_clip=-1.0 is out of range: it must be >= 0"),
    (["--weight_decay=-1"], "--weight_decay=-1.0 is out of range"),
    (["--max_iters=-5"], "--max_iters=-5 is out of range"),
    (["--warmup_iters=-10"], "--warmup_iters=-10 is out of range"),
    (["--lr_decay_iters=-1"], "--lr_decay_iters=-1 is out of range"),
    (["--n_layer=0"], "--n_layer=0 is out of range: it must be >= 1"),
    (["--n_head=0"], "--n_head=0 is out of range"),
    (["--n_embd=0"], "--n_embd=0 is out of range"),
    (["--n_embd=33"], "n_embd=33 must be a multiple of n_head=2"),
    (["--learning_rate=-1"], "--learning_rate=-1.0 is out of range: it must be > 0"),
    (["--learning_rate=0"], "--learning_rate=0.0 is out of range: it must be > 0"),
    (["--learning_rate=1e999"], "--learning_rate=inf is not a finite number"),
    (["--min_lr=-1e-5"], "--min_lr=-1e-05 is out of range"),
    (["--beta1=1"], "--beta1=1.0 is out of range: it must be [0, 1)"),
    (["--beta2=-0.1"], "--beta2=-0.1 is out of range"),
    (["--dropout=1"], "--dropout=1.0 is out of range: it must be [0, 1)"),
    (["--dropout=1.5"], "--dropout=1.5 is out of range"),
    (["--lora_dropout=2"], "--lora_dropout=2.0 is out of range"),
    (["--lora_alpha=-1"], "--lora_alpha=-1.0 is out of range: it must be > 0"),
    (["--lora_rank=-1"], "--lora_rank=-1 is out of range"),
    (["--quantize=nf4"], "--quantize=nf4 freezes the weights in 4 bits: it needs --lora_rank > 0"),
    (["--quantize=int8"], "--quantize=int8 is not one of none, nf4"),
    (["--sample_tokens=-1"], "--sample_tokens=-1 is out of range"),
    (["--batch_size=0"], "--batch_size=0 is out of range"),
    (["--block_size=0"], "--block_size=0 is out of range"),
    (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps=0 is out of range"),
    (["--eval_interval=0"], "--eval_interval=0 is out of range"),
    (["--eval_iters=0"], "--eval_iters=0 is out of range"),
    (["--log_interval=0"], "--log_interval=0 is out of range"),
    (["--seed=-1"], "--seed=-1 is out of range: it must be [0, 2**63)"),
    (["--seed=18446744073709551616"], "--seed=18446744073709551616 is out of range"),
    (["--peak_flops=-1"], "--peak_flops=-1.0 is out of range"),
    (["--pos_emb=alibi"], "pos_emb='alibi'"),
    (["--mlp=relu"], "mlp='relu'"),
    (["--device=cuda"], "--device=cuda is not available: this torch"),
    (["--device=cuda:7"], "--device=cuda:7 is not available"),
    (["--device=tpu"], "--device=tpu is not one of auto, cpu, cuda, cuda:N, mps; this torch"),
    (["--dtype=float8"], "--dtype=float8 is not one of auto, float32, bfloat16, float16"),
    (["--out_dir=/proc/nope"], "cannot write to --out_dir=/proc/nope"),
    (["--learning_rat=1e-3"], "did you mean --learning_rate"),
    (["--batch_size=two"], "--batch_size in the command line expects int"),
    (["--batch_size"], "--batch_size needs a value"),
    (["{root}/syntax.py"], "config file {root}/syntax.py, line 2"),
    (["{root}/raises.py"], "config file {root}/raises.py, line 2: ZeroDivisionError"),
    (["{root}/missing.py"], "cannot read config file {root}/missing.py"),
    (["shakespeare"], "'shakespeare' is neither --key=value nor a config file"),
    (["--dataset=mytext"], "prepare_data.py text --input=your.txt --out_dir={root}/data/mytext"),
    (["--dataset=tinystories"], "`python prepare_data.py tinystories`"),
    (["--dataset=badvocab"], "vocab_size must be a positive int, got 'abc'"),
    (["--dataset=negvocab"], "vocab_size must be a positive int, got -3"),
    (["--dataset=notoken"], "names no tokenizer"),
    (["--dataset=notjson"], "cannot read {root}/data/notjson/meta.json"),
    (["--block_size=5000"], "too few for --block_size=5000"),
    (["--sample_prompt="], "the evaluation sample starts from <|endoftext|> (id 50256), beyond the model's vocabulary"),
    (["--sample_prompt=hello world"], "--sample_prompt='hello world' has token ids beyond the model's vocabulary"),
    (["--init_from=gpt3"], "--init_from=gpt3"),
    (["--init_from=resume", "--out_dir={root}/nothing"], "no checkpoint at {root}/nothing/ckpt.pt"),
    (["--init_from=resume", "--out_dir={root}/garbage"], "is damaged or not a checkpoint of train.py or finetune_alpaca.py"),
    (["--out_dir={root}/by-train.py"], "ckpt.pt holds a run already: go on with --init_from=resume"),
    (["--init_from=resume", "--out_dir={root}/no-model-args"], "does not record its model's shape (model_args)"),
    (["--init_from=resume", "--out_dir={root}/by-train.py", "--n_layer=3"], "was trained with n_layer unrecorded"),
    (["--init_from=resume", "--out_dir={root}/by-finetune_alpaca.py"],
     "was written by finetune_alpaca.py: resume it with `python finetune_alpaca.py --init_from=resume"),
    (["--fsdp=True", "--lora_rank=4", "--quantize=nf4"], "--fsdp=True cannot shard 4-bit NF4 weights"),
    (["--fsdp=True", "--dtype=float16"], "--fsdp=True with float16 would need a sharded GradScaler"),
    (["--optimizer=sgd"], "--optimizer=sgd is not one of adamw, muon"),
    (["--fsdp=True", "--optimizer=muon"], "--optimizer=muon orthogonalizes each whole matrix, and under --fsdp=True"),
    (["--compile=True", "--activation_checkpointing=True", "--dropout=0.1"], "recomputes dropout with other masks"),
    (["--batch_size=None"], "--batch_size in the command line expects int (like 8), got None"),
    (["--learning_rate=None"], "--learning_rate in the command line expects float"),
    (["--compile=None"], "--compile in the command line expects bool"),
    (["{root}/none.py"], "--batch_size in {root}/none.py expects int"),
    (["{root}/exits.py"], "config file {root}/exits.py, line 2: it calls exit()"),
    (["--min_lr=1e-2"], "--min_lr=0.01 must be <= --learning_rate=0.0006"),
    (["--learning_rate=1e-5"], "--min_lr=6e-05 must be <= --learning_rate=1e-05"),
    (["--lr_decay_iters=50"], "--lr_decay_iters=50 must be > --warmup_iters=100 (or 0)"),
    (["--lr_decay_iters=100"], "--lr_decay_iters=100 must be > --warmup_iters=100"),
    (["--fsdp=True"], "--fsdp=True shards the model over the processes that torchrun starts, and there is one"),
    (["--lora_rank=17"], "--lora_rank=17: LoRA rank 17 is larger than attn.c_attn's 48 x 16 weight"),
    (["--dataset=smallvocab"], "the train split of {root}/data/smallvocab holds token id 127, beyond meta.json's "
                               "vocab_size=64"),
    (["--dataset=unrecorded"], "holds token id 127, beyond meta.json's vocab_size=64"),
    (["--dataset=cl100k", "--init_from={root}/hf"], "holds cl100k_base token ids, and --init_from={root}/hf reads gpt2 "
                                                    "ids: prepare the data with --tokenizer=gpt2"),
]


def alpaca(root):
    return [f"--init_from={root / 'hf'}", f"--data_path={root / 'alpaca.json'}", "--batch_size=2", "--device=cpu",
            "--dtype=float32", f"--out_dir={root / 'out-alpaca'}", "--max_iters=0"]


FINETUNE = [
    (["--learning_rate=-1"], "--learning_rate=-1.0 is out of range: it must be >= 0"),
    (["--lora_alpha=-1"], "--lora_alpha=-1.0 is out of range"),
    (["--lora_dropout=2"], "--lora_dropout=2.0 is out of range"),
    (["--dropout=1.5"], "--dropout=1.5 is out of range"),
    (["--grad_clip=-1"], "--grad_clip=-1.0 is out of range"),
    (["--weight_decay=-1"], "--weight_decay=-1.0 is out of range"),
    (["--max_iters=-1"], "--max_iters=-1 is out of range"),
    (["--warmup_iters=-1"], "--warmup_iters=-1 is out of range"),
    (["--val_size=-1"], "--val_size=-1 is out of range"),
    (["--val_size=20"], "--val_size=20 must be below the 20 records"),
    (["--subset=-1"], "--subset=-1 is out of range"),
    (["--max_seq_len=-1"], "--max_seq_len=-1 is out of range"),
    (["--max_seq_len=512"], "--max_seq_len=512 is longer than the model's context of 256 tokens"),
    (["--batch_size=0"], "--batch_size=0 is out of range"),
    (["--batch_size=64"], "too few for --batch_size=64"),
    (["--eval_prompts=-1"], "--eval_prompts=-1 is out of range"),
    (["--sample_tokens=0"], "--sample_tokens=0 is out of range"),
    (["--beta2=1"], "--beta2=1.0 is out of range"),
    (["--init_from=scratch"], "fine-tuning starts from trained weights"),
    (["--lora_rank=0", "--quantize=nf4"], "it needs --lora_rank > 0"),
    (["--fsdp=True", "--quantize=nf4"], "--fsdp=True cannot shard 4-bit NF4 weights"),
    (["--double_quant=False"], "--double_quant=False goes only with --quantize=nf4, not --quantize=none"),
    (["--data=alpaca"], "goes only with --data=alpaca-cleaned, not --data=alpaca"),
    (["--batch_size=None"], "--batch_size in the command line expects int"),
    (["--lora_rank=2000"], "--lora_rank=2000: LoRA rank 2000 is larger than"),
    (["--fsdp=True", "--dtype=float16"], "--fsdp=True with float16 would need a sharded GradScaler"),
    (["--optimizer=adam"], "--optimizer=adam is not one of adamw, muon"),
    (["--fsdp=True", "--optimizer=muon"], "use DDP (--fsdp=False), or --optimizer=adamw"),
    (["--data=nope", "--data_path="], "--data=nope is not one of alpaca-cleaned, alpaca"),
    (["--data_path={root}/missing.json"], "cannot read {root}/missing.json as Alpaca JSON"),
    (["--data_path={root}/notpython.txt"], "cannot read {root}/notpython.txt as Alpaca JSON"),
    (["--device=tpu"], "--device=tpu is not one of"),
    (["--out_dir=/proc/nope"], "cannot write to --out_dir=/proc/nope"),
    (["--init_from=resume", "--out_dir={root}/by-train.py"],
     "was written by train.py: resume it with `python train.py --init_from=resume"),
    (["--init_from=resume", "--out_dir={root}/garbage"], "is damaged or not a checkpoint"),
    (["--out_dir={root}/by-finetune_alpaca.py"], "ckpt.pt holds a run already: go on with --init_from=resume"),
]

SAMPLE = [
    (["--temperature=-1"], "--temperature=-1.0 is out of range: it must be >= 0"),
    (["--temperature=nan"], "--temperature=nan is not a finite number"),
    (["--top_p=inf"], "--top_p=inf is not a finite number"),
    (["--top_k=-5"], "--top_k=-5 is out of range"),
    (["--num_samples=0"], "--num_samples=0 is out of range"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 is out of range"),
    (["--top_p=0"], "--top_p=0.0 is out of range: it must be (0, 1]"),
    (["--seed=-3"], "--seed=-3 is out of range"),
    (["--device=cuda"], "--device=cuda is not available"),
    (["--device=tpu"], "--device=tpu is not one of"),
    (["--input=x"], "--input goes with an --instruction"),
    (["--adapter={root}/hf"], "cannot load the adapter in {root}/hf"),
    (["--init_from=resume", "--out_dir={root}/garbage"], "is damaged or not a checkpoint"),
    (["--port=0"], "--port=0 is out of range: it must be [1, 65535]"),
    (["--port=8080"], "--host and --port go with --serve"),
    (["--serve", "--interactive"], "--serve takes its prompts from the page, one sample each"),
    (["--serve", "--num_samples=3"], "leave out --interactive and --num_samples"),
    (["--serve", "--max_new_tokens=5000"], "--max_new_tokens=5000 is more than --serve generates at a time: at most 1024"),
]

PREPARE = [
    (["text", "shakespeare"], "one dataset at a time: got text and shakespeare"),
    (["nosuch"], "unknown dataset 'nosuch'"),
    (["text", "--val_fraction=1"], "--val_fraction=1.0 is out of range: it must be (0, 1)"),
    (["text", "--workers=-1"], "--workers=-1 is out of range"),
    (["text"], "text needs --input=FILE"),
    (["text", "--input={root}/alpaca.json", "--out_dir=/proc/nope"], "cannot write to --out_dir=/proc/nope"),
    (["text", "--keep_downloads=True"], "--keep_downloads applies to fineweb-edu, not text"),
    (["fineweb-edu", "--max_tokens=1.5"], "--max_tokens=1.5 is not a whole number of tokens"),
    (["fineweb-edu", "--shard_tokens=0"], "--shard_tokens=0.0 is out of range: it must be [1, 2147483647]"),
    (["fineweb-edu", "--out_dir={root}/fw"], "the list of files in HuggingFaceFW/fineweb-edu/sample/10BT is not "
                                             "cached and HF_HUB_OFFLINE forbids asking the hub"),
]

BENCH = [
    (["--train_steps=0"], "--train_steps=0 is out of range"),
    (["--parallel_steps=0"], "--parallel_steps=0 is out of range"),
    (["--only=nope"], "unknown section 'nope'"),
    (["--optimizers_muon_lr=0"], "--optimizers_muon_lr=0.0 is out of range: it must be > 0"),
    (["--only=optimizers", "--optimizers_dataset=nope"], "no dataset in data/nope (meta.json is missing)"),
]

CASES = ([("train", train.main, toy, args, words) for args, words in TRAIN]
         + [("finetune_alpaca", finetune_alpaca.main, alpaca, args, words) for args, words in FINETUNE]
         + [("sample", sample.main, lambda root: [f"--init_from={root / 'hf'}", "--max_new_tokens=2"], args, words)
            for args, words in SAMPLE]
         + [("prepare_data", prepare_data.main, lambda root: [], args, words) for args, words in PREPARE]
         + [("bench", bench.main, lambda root: [], args, words) for args, words in BENCH])


def fill(items, root):
    return [item.replace("{root}", str(root)) for item in items]


@pytest.mark.parametrize("script, main, base, args, words", CASES,
                         ids=[f"{c[0]} {' '.join(c[3])}" for c in CASES])
def test_a_mistake_is_one_line_naming_it(files, monkeypatch, capsys, script, main, base, args, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach for the network
    monkeypatch.setenv("GPT2REF_CACHE", str(files / "cache"))
    with pytest.raises(SystemExit) as e:
        main(fill(base(files) + args, files))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fill([words], files)[0] in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("script, args, words", [
    ("train.py", ["--grad_clip=-1"], "--grad_clip=-1.0 is out of range"),
    ("train.py", ["--device=cuda"], "--device=cuda is not available"),
    ("finetune_alpaca.py", ["--learning_rate=-1"], "--learning_rate=-1.0 is out of range"),
    ("sample.py", ["--temperature=-1"], "--temperature=-1.0 is out of range"),
    ("prepare_data.py", ["text", "shakespeare"], "one dataset at a time"),
    ("bench.py", ["--train_steps=0"], "--train_steps=0 is out of range"),
])
def test_as_a_process_a_mistake_is_exit_2_and_one_line(script, args, words):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr and not r.stdout, r.stderr


def test_help_prints_every_setting_with_its_default_and_note(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for key, value in train.DEFAULTS.items():
        assert f"--{key}={value!r}" in out
    assert "  AdamW and the learning-rate schedule" in out
    assert [line.split()[1:] for line in out.splitlines() if line.strip().startswith("--grad_clip=")] == \
        [[">=", "0;", "0:", "no", "clipping"]]


@pytest.mark.slow
def test_help_into_a_closed_pipe_is_quiet():
    r = subprocess.run(f"{sys.executable} {ROOT / 'train.py'} --help | head -1", shell=True, capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("Train a GPT") and "Traceback" not in r.stderr, r.stderr


def test_ranges_come_from_the_notes_beside_the_defaults(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('# --------- defaults\n# a group\nrate = 0.5  # (0, 1]; a note\ncount = 3  # >= 2\n'
                      'seed = 1  # [0, 2**3)\nfree = -1.0  # any number\n# ---------\nafter = 1  # > 5\n')
    assert cli.read_notes(script) == {"rate": ("a group", "(0, 1]; a note"), "count": ("a group", ">= 2"),
                                      "seed": ("a group", "[0, 2**3)"), "free": ("a group", "any number")}
    defaults = {"rate": 0.5, "count": 3, "seed": 1, "free": -1.0, "after": 1}
    assert cli.configure(defaults, ["--rate=1", "--count=2", "--seed=7", "--free=-9", "--after=0"],
                         source=script)["after"] == 0
    for bad in ("--rate=0", "--rate=1.01", "--count=1", "--seed=8", "--seed=-1", "--free=1e999"):
        with pytest.raises(SystemExit):
            cli.configure(defaults, [bad], source=script)


def test_float16_on_a_cpu_warns_in_one_line(capsys):
    assert cli.pick_dtype("float16", "cpu") == "float16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: float16 is for GPUs")
    assert cli.pick_dtype("float16", "cuda") == "float16" and capsys.readouterr().err == ""


@pytest.mark.slow
def test_scripts_import_library_modules_only():
    """Scripts import library code, never another script: sampling does not load the trainer's
    loop or the data pipeline."""
    import ast
    scripts = {"prepare_data", "train", "finetune_alpaca", "sample", "eval", "export", "bench"}
    for name in sorted(scripts):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & scripts, f"{name}.py imports {sorted(imported & scripts)}"
    r = subprocess.run([sys.executable, "-c", "import sys, sample; print(sorted(sys.modules))"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not set(eval(r.stdout)) & (scripts - {"sample"})


def test_wandb_log_without_wandb_is_one_line_before_any_work(files, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(toy(files) + ["--wandb_log=True", f"--out_dir={files / 'never'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "needs the wandb package" in err and "pip install wandb" in err
    assert not (files / "never").exists()  # refused before any work: not even the out_dir was made


def test_a_home_folder_path_is_expanded(tmp_path, monkeypatch):
    """--out_dir=~/x means the home folder's x, as in a shell, not a folder named ~ in this one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = cli.configure({"out_dir": "out", "init_from": "", "start": ""}, ["--out_dir=~/runs/a", "--start=~/not a path"])
    assert cfg["out_dir"] == str(tmp_path / "runs" / "a") and cfg["start"] == "~/not a path"


def test_relations_between_settings_come_from_the_notes(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("# ---------- defaults\nlow = 1.0        # >= 0, <= high\nhigh = 2.0       # > 0\n"
                      "cap = 0          # >= 0, > low unless 0; 0: none\nmode = 'a'\n"
                      "extra = False    # only with mode=b; extra work\n# ----------\n")
    defaults = {"low": 1.0, "high": 2.0, "cap": 0, "mode": "a", "extra": False}
    assert cli.relations(cli.read_notes(script)["cap"][1]) == [("compare", ">", "low", True)]
    assert cli.configure(defaults, ["--low=2", "--cap=0"], source=str(script))["low"] == 2
    assert cli.configure(defaults, ["--extra=True", "--mode=b"], source=str(script))["extra"] is True
    for bad in (["--low=3"], ["--cap=1"], ["--extra=True"]):
        with pytest.raises(SystemExit):
            cli.configure(defaults, bad, source=str(script))


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """The moment one sees a typo in the command: Ctrl-C while the imports run ends with one line and
    status 130. Sent once lib has loaded and while torch loads (about a second here)."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--help"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # importtime writes a line as each module finishes loading
        if line.rstrip().endswith("| lib"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
