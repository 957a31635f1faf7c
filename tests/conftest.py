import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _tiktoken_cache():
    """A tiktoken cache folder that holds gpt2's two files, copied from lib/gpt2_bpe/ under the
    names tiktoken gives them (the sha1 of their URLs), so that tiktoken's own gpt2, the tests'
    oracle, loads without a network; tiktoken still checks their sha256. The build and CI
    machines have a full cache beside the checkout, with cl100k_base too."""
    beside = ROOT.parent / "shared" / "tiktoken-cache"
    if beside.is_dir():
        return beside
    folder = Path(tempfile.gettempdir()) / "gpt2ref-tests-tiktoken-cache"
    folder.mkdir(exist_ok=True)
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        target = folder / hashlib.sha1(url.encode()).hexdigest()
        if not target.exists():
            shutil.copyfile(ROOT / "lib" / "gpt2_bpe" / name, f"{target}.tmp")
            os.replace(f"{target}.tmp", target)
    return folder


if "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_tiktoken_cache())


def cl100k_or_skip():
    """tiktoken's cl100k_base, or a skip: its file comes from the network or a filled cache."""
    import tiktoken
    try:
        return tiktoken.get_encoding("cl100k_base")
    except (OSError, ValueError):  # requests' errors are OSErrors; ValueError: a file that fails its sha256
        pytest.skip("tiktoken's cl100k_base file is out of reach: no network, and TIKTOKEN_CACHE_DIR does not hold it "
                    "(docs/offline.md)")



def pytest_configure(config):
    """Stop with one line, not a traceback per test module, when tiktoken cannot load gpt2."""
    if config.option.help:
        return
    import tiktoken

    try:
        tiktoken.get_encoding("gpt2")
    except (OSError, ValueError):
        pytest.exit(f"tiktoken cannot load gpt2 from TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']}: "
                    "remove that folder or fill it again (docs/offline.md)", returncode=2)
