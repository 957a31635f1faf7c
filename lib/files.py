"""Files written whole or not at all, and read strictly: the atomic write, sha256, strict JSON."""
import hashlib
import json
import os
import reprlib
from contextlib import contextmanager
from pathlib import Path

_reprs = reprlib.Repr()  # for error messages: a corrupt file can hold a 100 MB name or list
_reprs.maxstring = _reprs.maxother = 100
short = _reprs.repr


@contextmanager
def atomic_write(path):
    """`with atomic_write(p) as f: f.write(...)` writes p + '.tmp', fsyncs it and renames it over p:
    whenever the process stops, even by kill -9 or a power cut, p is the old file or the whole new
    one. An error leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path):
    """The sha256 of a file, read 4 MB at a time (a 6 GB file needs no 6 GB of memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(raw, bad):
    """Parse bytes as a JSON object, or raise bad(why): strictly UTF-8, no key given twice (json.loads
    would keep the last one silently), and no nesting so deep that the parser runs out of stack."""
    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"key {short(key)} given twice")
            obj[key] = value
        return obj

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"not JSON ({e})") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise bad("not a JSON object")
    return value
