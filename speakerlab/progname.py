"""The program name a usage line shows; a leaf module, so every CLI can use it without importing the
console-script entry points (speakerlab/cli.py), which import every stage."""
import os
import sys


def prog(module: str) -> str:
    """The name a usage line shows: ``python -m speakerlab.score`` when run as a module (argv[0] is then
    the .py file), the console script's name (``speakerlab-score``) when run as one."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name in ("-c", "-m"):
        return f"python -m {module}"
    return name
