"""Stage 1, extraction, as a small package:

- ``options``: ExtractOptions, the one dataclass the CLI fills (the library never sees argparse)
- ``runtime``: rank and world, device, CPU plan, versions
- ``coordinate``: the scan on rank 0 and its publication to the other ranks
- ``loader``: decoding in DataLoader workers, batches as a named tuple, the decode crash journal
- ``worker``: embed one shard into a store (knows nothing of ranks)
- ``main``: parser -> options -> run()

``python -m speakerlab.extract``, ``speakerlab.extract.main(argv)`` and extract_speaker_embeddings.py
are the entry points.
"""
from speakerlab.extract.options import ExtractOptions, UsageError
from speakerlab.extract.runtime import cpu_plan
from speakerlab.extract.worker import ModelStreams
from speakerlab.extract.main import build_parser, run, main  # noqa: E402  (main: the function, not the module)

__all__ = ["ExtractOptions", "UsageError", "ModelStreams", "build_parser", "cpu_plan", "main", "run"]
