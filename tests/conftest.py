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
