"""Export a model to the Hugging Face GPT-2 layout (config.json + model.safetensors), which
transformers' GPT2LMHeadModel, GPT.from_pretrained and every script's --init_from read.

    python export.py --init_from=out-tinystories --export_dir=hf-tinystories       # a train.py run
    python export.py --init_from=gpt2 --adapter=out-alpaca --export_dir=hf-alpaca   # LoRA folded in

A LoRA or QLoRA adapter is folded into its base weights (gpt.merge_and_unload); the result is a
plain float32 GPT-2. The RoPE and SwiGLU variants have no place in GPT-2's format.
"""
import os

import lib  # noqa: F401 -- first: a Ctrl-C while torch loads then ends the script with one line

import gpt
from lib import cli, models

# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
init_from = "resume"      # a train.py or finetune_alpaca.py out_dir | resume (--out_dir's run) | gpt2 | a HF directory
out_dir = "out"           # where --init_from=resume finds ckpt.pt
adapter = ""              # a LoRA or QLoRA adapter directory to fold into init_from's model
export_dir = "hf-export"  # where config.json and model.safetensors go
tokenizer = "gpt2"
# -----------------------------------------------------------------------------


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    cfg = cli.configure(defaults, argv, doc=__doc__, source=__file__)
    if os.path.isfile(os.path.join(cfg["export_dir"], "config.json")):
        cli.fail(f"{cfg['export_dir']} holds an exported model already: give another --export_dir (or remove it)")
    cli.writable_dir(cfg["export_dir"], "--export_dir")
    model, tokenizer_name = models.load_model(cfg)
    if tokenizer_name != "gpt2":
        cli.fail(f"the model reads {tokenizer_name} token ids; GPT-2's layout names gpt2's tokenizer, so transformers "
                 f"would decode its ids with the wrong vocabulary")
    try:
        gpt.merge_and_unload(model).save_pretrained(cfg["export_dir"])
    except ValueError as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(f"cannot write to --export_dir={cfg['export_dir']}: {e.strerror or e}")
    print(f"wrote {os.path.join(cfg['export_dir'], 'model.safetensors')} and config.json "
          f"({model.num_params() / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    cli.run(main)
