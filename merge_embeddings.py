#!/usr/bin/env python3
"""Stage 2: `python merge_embeddings.py --input_dir OUTPUT_DIR --output_dir FINAL_DIR` (installed: `speakerlab-merge`)."""
from speakerlab.cli import merge

if __name__ == "__main__":
    merge()
