#!/usr/bin/env python3
"""Stage 2: `python merge_embeddings.py --input_dir OUTPUT_DIR --output_dir FINAL_DIR`."""
import sys

from speakerlab.merge import main

if __name__ == "__main__":
    sys.exit(main())
