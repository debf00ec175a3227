"""Helpers of run_embedding_extraction.sh, kept in Python where bash would be fragile.

``python -m speakerlab.driver torchrun TORCHRUN_ARGS...``
    runs ``torch.distributed.run`` and shows the workers' output, not torchrun's own banner and
    failure report (38-58 lines of ChildFailedError traceback): a failed run ends with the failing
    worker's own last line (its ``error: ...``) and exits with that worker's exit code (128+N when
    signal N killed it). torchrun's own report is kept in a temporary file whose path is shown.
``python -m speakerlab.driver writable -- FLAG DIR``
    exit 2 with one line unless DIR can be written (or made).
``python -m speakerlab.driver summary FINAL_DIR [--since EPOCH_SECONDS]``
    prints one line from FINAL_DIR/summary.json: embedded / failed, audio hours, and with --since
    (when the run started) its wall time and x real time.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import List, Optional, Tuple

# torchrun's own log lines (glog style): "E1130 14:37:17.847000 6524 torch/distributed/...py:1002] ..."
TORCH_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\] ")
# The line that opens its failure report (a worker failed); all that follows is the launcher's.
FAILURE_OPENS = re.compile(rb"^E\d{4} .*\] failed \(exitcode: ")
BANNER = re.compile(rb"^(\*+|Setting OMP_NUM_THREADS environment variable .*)$")


class StderrFilter:
    """Passes the workers' stderr through as it comes (progress bars included) and keeps torchrun's."""

    def __init__(self, out):
        self.out = out
        self.pending = b""
        self.in_report = False
        self.blanks = 0  # blank lines held until the next line shows whose they are
        self.report: List[bytes] = []
        self.shown: deque = deque(maxlen=200)  # the workers' last non-blank lines

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line)
        # A progress bar redraws with "\r" and no newline: show what is there up to the last "\r".
        cut = self.pending.rfind(b"\r")
        if cut > 0 and not self.in_report:
            self._write(self.pending[:cut])
            self.pending = self.pending[cut:]

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = b""

    def _line(self, line: bytes) -> None:
        if not self.in_report and FAILURE_OPENS.match(line):
            self.in_report = True
        if self.in_report or TORCH_LOG.match(line) or BANNER.match(line.rstrip(b"\r")):
            self.report.append(line)
            self.blanks = 0  # torchrun's banner opens with a blank line: it goes with the banner
            return
        if not line.strip():
            self.blanks += 1
            return
        self._write(b"\n" * self.blanks + line + b"\n")
        self.blanks = 0
        text = line.split(b"\r")[-1].strip()
        if text:
            self.shown.append(text.decode("utf-8", "replace"))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()


def outcome(report: List[bytes], shown: List[str], returncode: int) -> Tuple[int, str]:
    """(exit code, last line to show) of a failed torchrun."""
    text = b"\n".join(report).decode("utf-8", "replace")
    root = text.split("Root Cause", 1)[-1] if "Root Cause" in text else ""
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    rank = re.search(r"\brank\s*:\s*(\d+)", root)
    if code is None:  # torchrun itself failed (rendezvous, port in use, ...): its last line says why
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else (shown[-1] if shown else f"torchrun exited with {returncode}")
        return returncode or 1, last if last.startswith("error:") else f"error: torchrun: {last}"
    worker_code = int(code.group(1))
    who = f"rank {rank.group(1)}" if rank else "a worker"
    if worker_code < 0:
        try:
            name = signal.Signals(-worker_code).name
        except ValueError:
            name = str(-worker_code)
        return 128 - worker_code, f"error: {who} was killed by signal {name}"
    errors = [line for line in shown if line.startswith("error:")]
    if errors:
        return worker_code, errors[-1]
    return worker_code, shown[-1] if shown else f"error: {who} exited with status {worker_code}"


def run_torchrun(torchrun_args: List[str]) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args], stderr=subprocess.PIPE)

    def forward(signum, _frame):  # scancel / kill: torchrun stops its workers itself
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    # Ctrl-C reaches torchrun and its workers from the terminal already; keep reading until they are gone
    signal.signal(signal.SIGINT, lambda *_: None)
    filt = StderrFilter(sys.stderr.buffer)
    while True:
        chunk = os.read(proc.stderr.fileno(), 1 << 16)
        if not chunk:
            break
        filt.feed(chunk)
    filt.close()
    returncode = proc.wait()
    if returncode == 0:
        return 0
    code, message = outcome(filt.report, list(filt.shown), returncode)
    if filt.report:  # kept for whoever needs torchrun's own account; the last line stays the worker's
        handle, path = tempfile.mkstemp(prefix="speakerlab-torchrun-", suffix=".log")
        with os.fdopen(handle, "wb") as log:
            log.write(b"\n".join(filt.report) + b"\n")
        print(f"(torchrun's own report of the failure: {path})", file=sys.stderr)
        print(message, file=sys.stderr)
    elif not filt.shown or filt.shown[-1] != message:
        print(message, file=sys.stderr)
    return code


def summary_line(final_dir: Path, wall_s: Optional[float]) -> str:
    from speakerlab.finaldir import FinalDir
    summary = FinalDir.open(final_dir).summary()  # checked against its completeness record
    hours = summary["total_duration_s"] / 3600
    parts = [f"{summary['total_utterances']} utterances embedded, {summary['failures']} failed"]
    if summary.get("scan_errors"):
        parts.append(f"{summary['scan_errors']} unreadable at the scan")
    audio_s = summary["total_duration_s"]
    parts.append(f"{hours:.2f} h of audio" + (f" ({audio_s:.1f} s)" if hours < 0.01 else ""))
    if wall_s:
        speed = audio_s / wall_s
        parts.append(f"{wall_s:.1f} s wall time ({speed:.1f}x real time)" if speed < 10 else
                     f"{wall_s:.0f} s wall time ({speed:.0f}x real time)")
    return "== done: " + ", ".join(parts) + f"; final files in {final_dir.absolute()}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"]:  # everything after it is torchrun's
        return run_torchrun(argv[1:])
    p = argparse.ArgumentParser(prog="python -m speakerlab.driver")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="one line from FINAL_DIR/summary.json")
    s.add_argument("final_dir")
    s.add_argument("--since", type=float, default=None, help="when the run started (seconds since the epoch)")
    w = sub.add_parser("writable", help="exit 2 with one line unless DIR can be written (or made)")
    w.add_argument("flag")
    w.add_argument("dir")
    sub.add_parser("torchrun", help="torchrun with its own noise kept out of the way (see the module doc)")
    args = p.parse_args(argv)
    if args.command == "summary":
        try:
            wall_s = None if args.since is None else max(time.time() - args.since, 1e-3)
            print(summary_line(Path(args.final_dir), wall_s))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: cannot summarise {args.final_dir}: {exc}", file=sys.stderr)
            return 1
        return 0
    from speakerlab.checks import writable_dir_problem
    problem = writable_dir_problem(args.dir, args.flag)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
