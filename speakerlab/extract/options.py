"""What one extraction run is asked to do: the options the CLI fills in (the library never sees argparse)."""
from dataclasses import dataclass, fields
from typing import List, Optional


class UsageError(Exception):
    """Bad arguments or inputs: one clear line, exit status 2."""


@dataclass
class ExtractOptions:
    output_dir: str
    data_root: Optional[str] = None
    manifest: Optional[str] = None
    kaldi_dir: Optional[str] = None
    dataset: Optional[str] = None
    model_path: Optional[str] = None
    config_file: Optional[str] = None
    use_gpu: bool = False
    gpu: Optional[List[int]] = None       # None: the LOCAL_RANK-th visible GPU (devices.choose_gpu)
    batch_size: Optional[int] = None      # None: 128 on CPU; on GPU the frame budget alone sizes batches
    batch_frames: Optional[int] = None
    num_workers: int = -1
    streams: int = -1
    dtype: str = "auto"
    backend: str = "auto"
    length_grid: str = "auto"
    no_fusion: bool = False
    channels: str = "first"
    max_chunk_s: float = 300.0
    flush_every: int = 1000
    flush_seconds: float = 60.0
    header_threads: int = 16
    overwrite: bool = False
    strict: bool = False
    no_progress: bool = False
    scan_timeout: float = 12 * 3600
    check_only: bool = False  # check input, model, config and output dir, then stop (the driver's pre-flight)

    @classmethod
    def from_namespace(cls, namespace) -> "ExtractOptions":
        """The dataclass from parsed arguments (attributes named like the fields)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    @property
    def fuse(self) -> bool:
        return not self.no_fusion

    @property
    def grid(self) -> Optional[bool]:
        """--length_grid as the embedder takes it: None = its default for the device."""
        return None if self.length_grid == "auto" else self.length_grid == "on"
