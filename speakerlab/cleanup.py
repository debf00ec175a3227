"""Stage 3: remove what the extraction wrote under the intermediate dir, and only that.

Only after verifying that the final dir is complete (its record and every file's sha256) and was
merged from *this* intermediate dir (the run ids of its ranks), and never when the intermediate dir
is, contains or is inside the data root, the final dir or an input list, or contains audio of the
run. Only the pipeline's own files are removed (known names, see rundir.py); anything else in the dir
is kept, and so is the dir. Otherwise one line, exit status 1, nothing removed.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from speakerlab.finaldir import FinalDir, FinalDirError
from speakerlab.rundir import RunDir, RunDirBusy, RunDirError


class Refused(Exception):
    pass


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(str(path)))


def _inside(inner: str, outer: str) -> bool:
    """Whether real path ``inner`` lies strictly below real path ``outer``."""
    return inner != outer and os.path.commonpath([inner, outer]) == outer


def check_overlap(run_dir: Path, protected: List[Tuple[str, str]], audio_paths,
                  containers: List[Tuple[str, str]] = ()) -> None:
    """Refuse when the run dir is, contains or is inside a ``protected`` path, is or contains one of
    ``containers``, or contains audio."""
    mine = _real(run_dir)
    for label, path in list(protected) + list(containers):
        theirs = _real(path)
        if theirs == mine:
            raise Refused(f"it is the {label} ({path})")
        if _inside(theirs, mine):
            raise Refused(f"it contains the {label} ({path})")
        if _inside(mine, theirs) and (label, path) in protected:
            raise Refused(f"it is inside the {label} ({path})")
    folders = {os.path.dirname(os.path.abspath(p)) for p in audio_paths}
    for folder in sorted(folders):
        for form in (os.path.abspath(folder), _real(folder)):
            if form == mine or _inside(form, mine):
                raise Refused(f"it contains audio of the run (in {folder})")


def verify(final_dir: Path, run_dir: RunDir) -> List[str]:
    """The run ids of ``run_dir``'s ranks, once ``final_dir`` verifies and was merged from exactly them."""
    try:
        final = FinalDir.open(final_dir, check_digests=True)
    except FinalDirError as exc:
        raise Refused(str(exc)) from None
    if final.summary().get("partial"):
        raise Refused("the merge was partial (--allow_partial); keeping the intermediate results")
    ids = run_dir.run_ids()
    if not ids or "" in ids:
        raise Refused("its ranks record no run id, so nothing shows the final dir was merged from it")
    if not any(sorted(run.get("run_ids", [])) == ids for run in final.runs):
        merged = "; ".join(", ".join(run.get("run_ids", [])) or "?" for run in final.runs) or "none"
        raise Refused(f"{final_dir} was not merged from it ({final_dir} holds run(s) {merged}; "
                      f"it holds run(s) {', '.join(ids)}); merge it first")
    return ids


def clean(final_dir: Path, intermediate: Path, extra_protected: List[Tuple[str, str]] = ()) -> str:
    """Remove the pipeline's files under ``intermediate``; what was done, as one line. Raises Refused."""
    run_dir = RunDir(intermediate)
    if not intermediate.is_dir():
        raise Refused("it is not a directory")
    if not run_dir.has_scan():
        raise Refused("it does not look like an extraction dir (no scan file)")
    try:
        scan = run_dir.load_scan()
    except RunDirError as exc:
        raise Refused(str(exc)) from None
    protected = [("final dir", str(final_dir))] + list(extra_protected)
    containers = []
    source = scan.source or {}
    if source.get("type", "tree") == "tree":
        protected.append(("data root", scan.data_root))
    else:
        if source.get("path"):
            protected.append(("manifest" if source["type"] == "manifest" else "Kaldi data dir", source["path"]))
        if source.get("base"):  # relative audio paths start there: a run dir may sit below it, never above
            containers.append(("base dir of the input's relative paths", source["base"]))
    check_overlap(intermediate, protected, (u.path for u in scan.utterances), containers)
    ids = verify(final_dir, run_dir)
    try:  # held while removing: no extraction can start in the dir meanwhile
        lock = run_dir.claim(f"cleanup-{os.getpid()}")
    except RunDirBusy as exc:
        raise Refused(f"an extraction still runs in it ({exc})") from None
    except RunDirError as exc:
        raise Refused(str(exc)) from None
    try:
        if run_dir.run_ids() != ids:  # a job came and went since the check: check again, from the start
            run_dir.release(lock)
            raise Refused("its ranks changed while it was being checked; run the clean-up again")
        files, dirs = run_dir.pipeline_entries()
        for path in files:
            path.unlink()
        for path in dirs:
            try:
                path.rmdir()
            except OSError:
                pass  # holds something the pipeline did not write: kept
    finally:
        lock.release()
    try:
        intermediate.rmdir()
        return f"removed {intermediate}"
    except OSError:
        left = sorted(p.name for p in intermediate.iterdir())
        shown = ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
        return (f"removed the extraction's files from {intermediate}; kept the dir, which holds files the "
                f"pipeline did not write ({shown})")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--final_dir", required=True)
    p.add_argument("--intermediate_dir", required=True)
    p.add_argument("--data_root", default=None, help="also never touch this (besides what the scan names)")
    p.add_argument("--manifest", default=None)
    p.add_argument("--kaldi_dir", default=None)
    args = p.parse_args(argv)
    final_dir, intermediate = Path(args.final_dir), Path(args.intermediate_dir)
    extra = [(label, value) for label, value in (("data root", args.data_root), ("manifest", args.manifest),
                                                 ("Kaldi data dir", args.kaldi_dir)) if value]
    try:
        print(clean(final_dir, intermediate, extra))
    except Refused as exc:
        print(f"error: not removing {intermediate}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: clean-up of {intermediate} stopped: {exc.filename or ''}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
