"""speakerlab.driver: torchrun's own output kept aside, the worker's last line and exit status out."""
import io

from speakerlab.driver import StderrFilter, outcome, summary_line

# torchrun 2.13's stderr for 2 CPU workers where rank 0 exits 2 (recorded), around the workers' lines
BANNER = b"""W1130 14:40:50.123000 10010 torch/distributed/run.py:851] 
W1130 14:40:50.123000 10010 torch/distributed/run.py:851] *****************************************
W1130 14:40:50.123000 10010 torch/distributed/run.py:851] Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed. 
W1130 14:40:50.123000 10010 torch/distributed/run.py:851] *****************************************

*****************************************
Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed. 
*****************************************
"""
REPORT = b"""E1130 14:40:54.925000 10010 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 10019) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
extract_speaker_embeddings.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_14:40:54
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 10019) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""
WORKERS = (b"2026-11-30 14:40:54,756 INFO reusing tmp2/scan.json (2 utterances)\n"
           b"error: rank 0: no audio files found under /data\n"
           b"error: no audio files found under /data\n")


def run_filter(data: bytes, chunk: int = 7):
    out = io.BytesIO()
    filt = StderrFilter(out)
    for start in range(0, len(data), chunk):  # arriving in pieces, as from a pipe
        filt.feed(data[start:start + chunk])
    filt.close()
    return filt, out.getvalue()


def test_only_the_workers_lines_pass():
    filt, shown = run_filter(BANNER + WORKERS + REPORT)
    assert shown == WORKERS
    assert outcome(filt.report, list(filt.shown), 1) == (2, "error: no audio files found under /data")


def test_progress_bars_pass_as_they_come():
    out = io.BytesIO()
    filt = StderrFilter(out)
    filt.feed(b"\rrank 0:  10%|#  | 1/10")
    filt.feed(b"\rrank 0:  20%|## | 2/10")
    assert out.getvalue() == b"\rrank 0:  10%|#  | 1/10"  # shown up to the latest redraw
    filt.feed(b"\rrank 0: 100%|###| 10/10\n")
    filt.close()
    assert out.getvalue().endswith(b"\rrank 0: 100%|###| 10/10\n") and filt.report == []


def test_killed_worker_and_failed_launcher():
    report = REPORT.replace(b"exitcode  : 2 (pid: 10019)", b"exitcode  : -9 (pid: 10019)").split(b"\n")
    assert outcome(report, ["INFO something"], 1) == (137, "error: rank 0 was killed by signal SIGKILL")
    # a worker that raised: its traceback's last line
    report = REPORT.replace(b"exitcode  : 2", b"exitcode  : 1").split(b"\n")
    assert outcome(report, ["Traceback (most recent call last):", "RuntimeError: boom"], 1) == (1, "RuntimeError: boom")
    # torchrun itself failed (no worker ran): its own last line
    own = [b"Traceback (most recent call last):", b"torch.distributed.DistNetworkError: port 29500 is in use"]
    assert outcome(own, [], 1) == (1, "error: torchrun: torch.distributed.DistNetworkError: port 29500 is in use")


def test_summary_line(tmp_path):
    import numpy as np
    from speakerlab import finaldir
    empty = np.zeros((0, 4), np.float32)  # a final dir (read through its record) whose summary says:
    finaldir.write(tmp_path, ["pkl"], [], empty, [], [], empty, [], [],
                   {"total_utterances": 1200, "failures": 3, "scan_errors": 1, "total_duration_s": 7200.0})
    assert summary_line(tmp_path, 60.0) == (
        f"== done: 1200 utterances embedded, 3 failed, 1 unreadable at the scan, 2.00 h of audio, "
        f"60 s wall time (120x real time); final files in {tmp_path}")
    assert summary_line(tmp_path, None).endswith(f"2.00 h of audio; final files in {tmp_path}")
