"""Files written before the redesign into gpt.py's three parts and lib/ still load: a train.py
checkpoint (and its run resumes), a Hugging Face export and a LoRA adapter, made by the code of
commit d06bc67 (tests/fixtures/before_lib/make.py), each giving the logits that code computed."""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

import gpt
import train
from gpt import GPT
from lib import checkpoints, datasets, models, weightfiles

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "before_lib"


def test_a_checkpoint_an_export_and_an_adapter_from_before_load_with_their_logits():
    expected = weightfiles.read_safetensors(FIXTURES / "expected.safetensors")
    x = expected["input"]
    trained = models.model_from_checkpoint(checkpoints.load(FIXTURES / "run" / "ckpt.pt")).eval()
    exported = GPT.from_pretrained(FIXTURES / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(x)[0], expected["run"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(x)[0], expected["hf"], rtol=1e-5, atol=1e-6)
        assert gpt.load_adapter(exported, FIXTURES / "adapter")["rank"] == 2
        torch.testing.assert_close(exported(x)[0], expected["adapter"], rtol=1e-5, atol=1e-6)


def test_a_run_from_before_resumes(tmp_path):
    """The same random-walk data the run was trained on (make.py), then two more iterations."""
    rng = np.random.default_rng(0)
    (tmp_path / "toy").mkdir()
    for split, n in (("train", 4000), ("val", 1000)):
        datasets.write_tokens(tmp_path / "toy" / f"{split}.bin", np.cumsum(rng.choice([1, 2], size=n)) % 128, 128)
    (tmp_path / "toy" / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 128, "eot_token": 50256}))
    shutil.copytree(FIXTURES / "run", tmp_path / "run")
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path}", "--max_iters=6"])
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == list(range(6))
    assert checkpoints.load(tmp_path / "run" / "ckpt.pt")["iter"] == 6
