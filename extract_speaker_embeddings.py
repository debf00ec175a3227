#!/usr/bin/env python3
"""Stage 1 worker: `python extract_speaker_embeddings.py ...` or `torchrun ... extract_speaker_embeddings.py ...`."""
import logging
import os
import sys

from speakerlab.extract import main

if __name__ == "__main__":
    status = main()
    # Every result is written (atomically, files closed) by now. Skip the interpreter's teardown of
    # torch, which took 0.4 s -- 5% of a 20-minute-audio CPU run; a worker has nothing left to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
