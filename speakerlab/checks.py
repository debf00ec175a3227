"""Quick argument checks that run before any heavy work (``extract --check_only``, the driver)."""
import os
import tempfile
from pathlib import Path
from typing import Optional


def writable_dir_problem(path, flag: str = "--output_dir") -> Optional[str]:
    """None if ``path`` is a directory we can write in, or could be made in a folder we can write in;
    else why not, in one line. A probe file is made and removed, so a read-only mount or a permission
    that root's capabilities do not override is caught too (os.access alone misses both)."""
    path = Path(path).absolute()
    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        what = "is not a directory" if folder == path else f"cannot be made: {folder} is not a directory"
        return f"{flag} {path} {what}"
    try:
        handle, probe = tempfile.mkstemp(prefix=".speakerlab-write-check-", dir=folder)
    except OSError as exc:
        where = "" if folder == path else f" (it would be made in {folder})"
        return f"{flag} {path} is not writable{where}: {exc.strerror or exc}"
    os.close(handle)
    os.unlink(probe)  # our own probe file, made just above
    return None
