"""Command-line plumbing shared by the scripts: --key=value config, one-line errors, device and dtype.

    python train.py config/tinystories.py --batch_size=8 --compile=False

Bare arguments are config files (plain Python that assigns some of the script's keys), applied in
order; then each --key=value, its value read as a Python literal and checked against the type of
the default. A mistake is one line on stderr and exit status 2, never a traceback.
"""
import ast
import contextlib
import difflib
import sys

import torch


def fail(message):
    """Stop on a user mistake: one line saying what is wrong and what to do, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        fail(f"unknown option --{key} in {where}{hint}; run with --help to list the options")


def _coerce(key, value, default, where):
    """Check value against the default's type; ints may stand for floats."""
    if default is None or value is None:
        return value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        fail(f"--{key} in {where} expects {kind.__name__} (like {default!r}), got {value!r}")
    return value


def _parse_literal(text, default):
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: --dataset=tinystories
    # a string option keeps the text as written: --out_dir=123 means the folder "123"
    return text if isinstance(default, str) and not isinstance(value, str) else value


def configure(defaults, argv=None, doc=None):
    """Return a copy of defaults overridden by the config files and --key=value args in argv."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print(doc or "options (--key=value):")
            for key, value in defaults.items():
                print(f"  --{key}={value!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            try:
                source = open(arg).read()
            except OSError as e:
                fail(f"cannot read config file {arg}: {e.strerror}")
            namespace = {}
            exec(compile(source, arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                _check_key(key, defaults, arg)
                config[key] = _coerce(key, value, defaults[key], arg)
            continue
        key, eq, text = arg[2:].partition("=")
        _check_key(key, defaults, "the command line")
        if not eq:  # a bare --flag switches a boolean on
            if not isinstance(defaults[key], bool):
                fail(f"--{key} needs a value: --{key}=...")
            text = "True"
        config[key] = _coerce(key, _parse_literal(text, defaults[key]), defaults[key], "the command line")
    return config


def pick_device(device="auto"):
    """auto means the fastest thing present: cuda > mps > cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device):
    """auto means bfloat16 where the hardware computes in it natively, else float16 on CUDA, else float32."""
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            fail(f"--dtype={dtype} is not one of auto, float32, bfloat16, float16")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


def autocast(device, dtype):
    """Mixed precision for the forward pass; float32 runs as is."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
