#!/usr/bin/env python3
"""Stage 1 worker: `python extract_speaker_embeddings.py ...` or `torchrun ... extract_speaker_embeddings.py ...`."""
import logging
import os
import sys

# oneDNN (CPU) keeps the kernels it builds per input shape in a cache of 1024 by default: a few
# batch shapes of CAM++ fill it. Batches are padded to grid lengths so shapes repeat; this lets
# their kernels stay (set before torch loads; an explicit setting wins).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

from speakerlab.extract import main  # noqa: E402

if __name__ == "__main__":
    status = main()
    # Every result is written (atomically, files closed) by now. Skip the interpreter's teardown of
    # torch, which took 0.4 s -- 5% of a 20-minute-audio CPU run; a worker has nothing left to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
