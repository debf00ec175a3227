"""Atomic file writes shared by the run dir (rundir.py) and the final dir (finaldir.py).

Every file is written to a temporary name beside its target and renamed, so a reader never sees half
a file. A write that fails (disk full, read-only filesystem) removes its temporary file and raises an
``OSError`` that names the target path and the cause.
"""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

# Names of our temporary files and dirs: ".<name>.tmp<pid>[.npz]", ".scan.tmp<pid>", ".write-test.tmp<pid>"
_TEMP = re.compile(r"\..+\.tmp\d*(\.npz)?")


def _failed(path: Path, exc: OSError, *temps: Path) -> OSError:
    for temp in temps:
        try:
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                temp.unlink(missing_ok=True)
        except OSError:
            pass
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _failed(path, exc, tmp) from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False, default=str).encode("utf-8"))


def atomic_write_pickle(path: Path, obj) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def atomic_write_npz(path: Path, **arrays) -> None:
    import numpy as np
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        raise _failed(path, exc, tmp) from None


def read_json(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.fullmatch(name))


def remove_temp_files(directory: Path) -> None:
    """Remove our temporary files left in ``directory`` by killed processes (never anything else)."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for entry in entries:
        if is_temp_name(entry.name) and not entry.is_symlink():
            try:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                pass
