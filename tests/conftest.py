import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The build and CI machines reach package registries only: use the offline tiktoken cache
# that sits beside the checkout when there is one (see its README).
_cache = ROOT.parent / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)



def pytest_configure(config):
    """Stop with one line, not a traceback per test module, when tiktoken's files are out of reach."""
    if config.option.help:
        return
    import pytest
    import tiktoken

    try:
        for name in ("gpt2", "cl100k_base"):  # the two encodings the tests use
            tiktoken.get_encoding(name)
    except (OSError, ValueError):  # requests' errors are OSErrors; ValueError: a file that fails its sha256
        pytest.exit("the tests need tiktoken's gpt2 and cl100k_base files: connect to the network once, or set "
                    "TIKTOKEN_CACHE_DIR to a folder holding them (docs/offline.md)", returncode=2)
