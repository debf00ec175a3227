"""Console scripts (pyproject.toml) and the top-level scripts of a checkout call these."""
import logging
import os
import sys

from speakerlab.progname import prog  # noqa: F401  (kept importable from here)


def extract() -> None:
    """Stage 1 worker: ``speakerlab-extract ...``, ``python extract_speaker_embeddings.py ...`` or under torchrun."""
    from speakerlab.extract import main
    status = main()
    # Every result is written (atomically, files closed) by now. Skip the interpreter's teardown of
    # torch, which took 0.4 s -- 5% of a 20-minute-audio CPU run; a worker has nothing left to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def merge() -> None:
    """Stage 2: ``speakerlab-merge --input_dir OUTPUT_DIR --output_dir FINAL_DIR``."""
    from speakerlab.merge import main
    sys.exit(main())
