"""The README and docs/ pages stay honest: every relative link resolves (its file, and its heading
where it names one), and every command line they show for one of the project's scripts uses only
that script's settings."""
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SCRIPTS = ("prepare_data.py", "train.py", "finetune_alpaca.py", "sample.py", "eval.py", "export.py", "bench.py")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"^\s*(?:python|torchrun)\s")
ALWAYS = {"help"}  # every script answers --help


def settings(script):
    """The settings a script accepts: its DEFAULTS, or its module-level defaults as its main() collects them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = __import__(script[:-3])
    if hasattr(module, "DEFAULTS"):
        return set(module.DEFAULTS)
    return {k for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, (int, float, str))}


def code_lines(text):
    """The lines of fenced code blocks and of 4-space indented blocks (after a blank line)."""
    lines, fenced, previous_blank, indented = [], False, True, False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            lines.append(line)
        elif line.startswith("    ") and (previous_blank or indented) and stripped:
            indented = True
            lines.append(line)
        elif stripped:
            indented = False
        previous_blank = not stripped
    return lines


def bad_flags(line, known):
    """The --flags a command line gives its script that the script does not have, as (script, flag)."""
    line = line.split("  #")[0].split(" # ")[0]
    if not COMMAND.match(line):
        return []
    out = []
    for command in re.split(r"&&|;|\|", line):
        try:
            words = shlex.split(command.replace("\\", " "))
        except ValueError:
            words = command.split()
        script = next((i for i, w in enumerate(words) if Path(w).name in SCRIPTS), None)
        if script is None:
            continue
        name = Path(words[script]).name
        for word in words[script + 1:]:
            if word.startswith("--"):
                key = word[2:].split("=", 1)[0]
                if key and key not in known(name) and key not in ALWAYS:
                    out.append((name, word))
    return out


_known = {}


def known(script):
    if script not in _known:
        _known[script] = settings(script)
    return _known[script]


def test_pages_exist():
    assert (ROOT / "README.md").exists() and len(PAGES) > 5
    assert (ROOT / "docs" / "serve.png").exists()


def anchors(text):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def broken_links(page, text):
    """The relative link targets in text (a page in page's folder) whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else None
        if file is not None and not file.exists():
            broken.append(target)
        elif anchor and (file is None or file.suffix == ".md"):
            if anchor not in anchors(file.read_text() if file else text):
                broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = broken_links(page, page.read_text())
    assert not broken, f"{page.name}: links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_flags_are_settings(page):
    bad = [(line.strip(), flag) for line in code_lines(page.read_text()) for _, flag in bad_flags(line, known)]
    assert not bad, f"{page.name}: flags the script does not have: {bad}"


def test_the_checks_can_fail():
    text = "Run it:\n\n    python train.py config/cpu_tiny.py --no_such_setting=3 --max_iters=5\n\nDone.\n"
    lines = code_lines(text)
    assert lines and bad_flags(lines[0], known) == [("train.py", "--no_such_setting=3")]
    torchrun = "torchrun --standalone --nproc_per_node=2 sample.py --init_from=gpt2 --made_up"
    assert bad_flags(torchrun, known) == [("sample.py", "--made_up")]
    assert bad_flags("python prepare_data.py text --input=a.txt --force", known) == []
    assert code_lines("prose\n```\npython eval.py --x=1\n```\n") == ["python eval.py --x=1"]
    page = ROOT / "docs" / "x.md"
    text = ("# A title: x.py\n[a](training.md#x) [b](../gpt.py) [c](no-such-page.md) [d](https://e.org/f) "
            "[g](#h) [i](gpt.py) [j](#a-title-xpy) [k](training.md#training-trainpy)")
    assert broken_links(page, text) == ["training.md#x", "no-such-page.md", "#h", "gpt.py"]


def setup_commands(text):
    """The python commands of the README's first setup command (the one that prepares the plays),
    its lines joined where they end in &&."""
    lines = code_lines(text)
    start = next(i for i, line in enumerate(lines) if "prepare_data.py plays" in line or line.rstrip().endswith("&&"))
    joined = ""
    for line in lines[start:]:
        joined += " " + line.strip()
        if not line.rstrip().endswith("&&"):
            break
    return [part.strip() for part in joined.split("&&") if part.strip().startswith("python ")]


@pytest.mark.slow
def test_the_setup_command_trains_and_samples_offline(tmp_path):
    """The README's first command, its install left out, in a fresh folder with no tiktoken cache
    and no hub: the shipped plays are prepared, config/cpu_tiny.py trains (shortened here to 20
    steps), and the sample continues the prompt."""
    import subprocess
    commands = setup_commands((ROOT / "README.md").read_text())
    assert [c.split()[1] for c in commands] == ["prepare_data.py", "train.py", "sample.py"], commands
    for name in [*SCRIPTS, "gpt.py", "lib", "config"]:
        (tmp_path / name).symlink_to(ROOT / name)
    shorter = {"train.py": ["--max_iters=20", "--eval_interval=10", "--eval_iters=2"], "sample.py": ["--max_new_tokens=20"]}
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": str(tmp_path / "no-cache")}
    for command in commands:
        words = shlex.split(command)
        done = subprocess.run([sys.executable, *words[1:], *shorter.get(words[1], [])], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
    assert done.stdout.startswith("ROMEO:") and len(done.stdout) > len("ROMEO:") + 20, done.stdout
    assert (tmp_path / "data" / "plays" / "meta.json").exists() and (tmp_path / "out-cpu-tiny" / "ckpt.pt").exists()
