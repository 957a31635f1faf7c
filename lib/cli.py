"""Command-line plumbing shared by the scripts: --key=value config, one-line errors, device and dtype.

    python train.py config/tinystories.py --batch_size=8 --compile=False

Bare arguments are config files (plain Python that assigns some of the script's keys), applied in
order; then each --key=value, its value read as a Python literal and checked against the type of
the default. A mistake is one line on stderr and exit status 2, never a traceback.

Each script lists its settings in a block of `key = default  # note` lines (prepare_data.py and
bench.py: `"key": default,  # note`) between a "# --- defaults" line and the next "# ---" line.
A note may open with the setting's valid range, `>= 0`, `> 0`, or an interval like `[0, 1)`:
configure() enforces it on the final settings, wherever each value came from, and --help prints
every setting with its default and its note, grouped as the block groups them.
"""
import ast
import contextlib
import difflib
import io
import math
import os
import re
import signal
import sys
import tempfile
import tokenize
import traceback

import torch

import lib

if signal.getsignal(signal.SIGINT) is lib._interrupted:  # torch has loaded: Ctrl-C is KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.default_int_handler)


def fail(message):
    """Stop on a user mistake: one line saying what is wrong and what to do, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(main):
    """Run a script's main(): a Ctrl-C that the script does not handle itself ends it with one line
    and exit status 130, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


def writable_dir(path, option="--out_dir"):
    """Create the folder if need be and check that files can be written in it, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"cannot write to {option}={path}: {e.strerror or e}")


# ----------------------------------------------------------------------------- the defaults block

_KEY = re.compile(r'\s*"?([A-Za-z_]\w*)"?\s*[=:]')
_NUM = r"-?\d+(?:\.\d*)?(?:e-?\d+)?(?:\*\*\d+)?|inf"
_RANGE = re.compile(rf"(>=|>)\s*({_NUM})|([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])")


def read_notes(source):
    """{key: (group, note)} from the defaults block of the script at path source; group is the
    comment line heading the key's part of the block, note the comment beside the key."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    comments = {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.COMMENT}
    notes, group, inside, opening = {}, "", False, 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("# ---"):
            if inside:
                break
            inside, opening = line.rstrip().endswith("defaults"), number
        elif inside and line.lstrip().startswith("#") and number == opening + 1 and "cli.py" in line:
            continue  # the block's first line says that the ranges below are enforced, here
        elif inside and line.lstrip().startswith("#"):
            group = comments[number]
        elif inside and _KEY.match(line):
            notes[_KEY.match(line).group(1)] = (group, comments.get(number, ""))
    return notes


def _number(text):
    """A bound as written: 1, 0.5, 6e-5, 2**63 (an exact int), inf."""
    if "**" in text:
        base, power = text.split("**")
        return int(base) ** int(power)
    return int(text) if text.lstrip("-").isdigit() else float(text)


def valid_range(note):
    """(low, low_open, high, high_open, text) for a note opening with a range, else None."""
    m = _RANGE.match(note)
    if not m:
        return None
    if m.group(1):
        return _number(m.group(2)), m.group(1) == ">", math.inf, True, m.group(0)
    return _number(m.group(4)), m.group(3) == "(", _number(m.group(5)), m.group(6) == ")", m.group(0)


def range_error(key, value, note):
    """What is wrong with the number value of setting key, if anything: not finite, or outside the
    range its note states (sample.py --serve checks a request's settings with it too)."""
    if not math.isfinite(value):
        return f"{key}={value} is not a finite number"
    bounds = valid_range(note)
    if bounds is None:
        return None
    low, low_open, high, high_open, text = bounds
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        rest = note[len(text):].lstrip(";: ")
        return f"{key}={value} is out of range: it must be {text}" + (f" ({rest})" if rest else "")
    return None


def check_ranges(config, notes):
    """Every number finite, and inside the range its note states."""
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        error = range_error(key, value, notes.get(key, ("", ""))[1])
        if error:
            fail(f"--{error}")


# A note may go on, after its range, with relations to other settings, each after a comma:
#     min_lr = 6e-5           # >= 0, <= learning_rate
#     lr_decay_iters = 0      # >= 0, >= warmup_iters unless 0; ...
#     double_quant = True     # only with quantize=nf4; ...
# "OP key" compares the two settings' values ("unless 0": a 0 means something else and passes);
# "only with key=value": a setting changed from its default needs that other setting's value.
_RELATION = re.compile(r",\s*(?:(<=|<|>=|>)\s*([A-Za-z_]\w*)( unless 0)?|only with ([A-Za-z_]\w*)=([^\s;,]+))")
_COMPARE = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}


def relations(note):
    """The relations a note states, as ("compare", op, key, unless_0) or ("only with", key, value)."""
    bounds = valid_range(note)
    rest, found = note[len(bounds[4]) if bounds else 0:], []
    if not bounds and rest.startswith("only with"):
        rest = ", " + rest
    while m := _RELATION.match(rest):
        found.append(("compare", m.group(1), m.group(2), bool(m.group(3))) if m.group(1) else
                     ("only with", m.group(4), m.group(5)))
        rest = rest[m.end():]
    return found


def check_relations(config, defaults, notes):
    """Every relation a note states between settings holds."""
    for key, value in config.items():
        for relation in relations(notes.get(key, ("", ""))[1]):
            if relation[0] == "compare":
                _, op, other, unless_0 = relation
                if not (unless_0 and value == 0) and not _COMPARE[op](value, config[other]):
                    fail(f"--{key}={value} must be {op} --{other}={config[other]}"
                         + (" (or 0)" if unless_0 else "") + ": change one of them")
            elif value != defaults[key] and str(config[relation[1]]) != relation[2]:
                fail(f"--{key}={value} goes only with --{relation[1]}={relation[2]}, not --{relation[1]}="
                     f"{config[relation[1]]}: leave --{key} out, or set --{relation[1]}={relation[2]}")


def print_help(defaults, notes, doc):
    """The script's docstring, then every setting with its default and note, by group."""
    lines = [doc or "", "settings (--key=value), with their defaults:"]
    group = None
    for key, value in defaults.items():
        heading, note = notes.get(key, ("", ""))
        if heading != group:
            group = heading
            lines.append(f"\n  {heading}" if heading else "")
        option = f"    --{key}={value!r}"
        lines.append(f"{option:40s} {note}".rstrip() if note else option)
    try:
        print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head` closed the pipe: not a mistake
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


# ----------------------------------------------------------------------------- parsing

def _check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        fail(f"unknown option --{key} in {where}{hint}; run with --help to list the options")


def _coerce(key, value, default, where):
    """Check value against the default's type; ints may stand for floats. None is no value."""
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
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if isinstance(default, float):
            try:
                return float(text)  # nan or inf: a float, which the range check then refuses
            except ValueError:
                pass
        return text  # a bare word: --dataset=tinystories
    # a string option keeps the text as written: --out_dir=123 means the folder "123"
    return text if isinstance(default, str) and not isinstance(value, str) else value


PATH_KEY = re.compile(r"(_dir|_path|^out|^input|^init_from|^adapter)$")  # the settings that name files or folders


def run_config_file(path):
    """The names a config file assigns; a file that cannot be read, parsed or run is one line
    naming the file and the line at fault."""
    if not path.endswith(".py") and not os.path.isfile(path):
        fail(f"{path!r} is neither --key=value nor a config file (a .py file of key = value lines)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}")
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        fail(f"config file {path}, line {e.lineno}: {e.msg}")
    except SystemExit:  # exit() or sys.exit() would end the run without a word, with status 0
        line = next((f.lineno for f in reversed(traceback.extract_tb(sys.exc_info()[2])) if f.filename == path), "?")
        fail(f"config file {path}, line {line}: it calls exit(); a config file only assigns settings")
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        fail(f"config file {path}, line {line}: {type(e).__name__}: {e}")
    return {k: v for k, v in namespace.items() if not k.startswith("_") and type(v).__name__ != "module"}


def configure(defaults, argv=None, doc=None, source=None):
    """Return a copy of defaults overridden by the config files and --key=value args in argv, each
    number checked against the range its note in source's defaults block states."""
    notes = read_notes(source) if source else {}
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print_help(defaults, notes, doc)
        if not arg.startswith("--"):
            for key, value in run_config_file(arg).items():
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
    for key, value in config.items():  # ~ is the home folder, as in a shell (which leaves --key=~/x alone)
        if isinstance(value, str) and PATH_KEY.search(key) and value.startswith("~"):
            config[key] = os.path.expanduser(value)
    check_ranges(config, notes)
    check_relations(config, defaults, notes)
    return config


# ----------------------------------------------------------------------------- device and dtype

def devices():
    """The devices this torch can use here, for messages."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + ["mps"] if torch.backends.mps.is_available() else found


def pick_device(device="auto"):
    """auto means the fastest thing present: cuda > mps > cpu. Anything else must be there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    here = f"this torch ({torch.__version__}) has {', '.join(devices())}"
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        fail(f"--device={device} is not one of auto, cpu, cuda, cuda:N, mps; {here}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        fail(f"--device={device} is not available: {here}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device={device} is not available: {here}")
    return device


def pick_dtype(dtype, device):
    """auto means bfloat16 where the hardware computes in it natively, else float16 on CUDA, else float32."""
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            fail(f"--dtype={dtype} is not one of auto, float32, bfloat16, float16")
        if dtype == "float16" and device == "cpu":
            print("warning: float16 is for GPUs; a CPU has no fast float16 kernels and can run it many times "
                  "slower than float32 (use --dtype=bfloat16 or float32)", file=sys.stderr)
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
