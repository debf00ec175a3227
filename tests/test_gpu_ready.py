"""The GPU path's logic, tested on CPU (issue 15): GPU mapping with a mocked device count, the OOM
retry against an allocator that really holds memory, a loop that never reads device values back,
fp32 that is fp32, an fp32 BatchNorm bias under bf16, and the dtype default by compute capability."""
import logging
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speakerlab import devices
from speakerlab.config import load_config
from speakerlab.devices import GpuMappingError, choose_gpu
from speakerlab.embedder import Embedder, default_dtype
from speakerlab.models import load_model
from speakerlab.models.fusion import conv_bn, enable_fusion
from tests.helpers import tone


# --- fault 2: which GPU a rank takes -------------------------------------------------------------
def test_default_is_the_local_rank_th_visible_gpu():
    assert [choose_gpu(None, r, 4, 4)[0] for r in range(4)] == [0, 1, 2, 3]
    assert [choose_gpu(None, r, 2, 8)[0] for r in range(2)] == [0, 1]


def test_more_ranks_than_gpus_is_one_clear_error():
    with pytest.raises(GpuMappingError, match=r"8 ranks on this node but 4 GPU\(s\) visible.*--gpu 0 1 2 3 0 1 2 3"):
        choose_gpu(None, 5, 8, 4)


def test_short_list_is_an_error_and_repeats_share_deliberately():
    # the seed's silent case: --nproc_per_node 8 --gpu 0 1 2 3 put two ranks on GPUs 0-3, 4-7 idle
    with pytest.raises(GpuMappingError, match=r"--gpu lists 4 id\(s\) for 8 ranks"):
        choose_gpu([0, 1, 2, 3], 0, 8, 8)
    assert [choose_gpu([0, 0], r, 2, 1)[0] for r in range(2)] == [0, 0]      # two ranks, one GPU: asked for
    assert [choose_gpu([3, 1], r, 2, 4)[0] for r in range(2)] == [3, 1]


def test_ids_beyond_the_visible_gpus_are_named():
    with pytest.raises(GpuMappingError, match=r"--gpu 4 5: only 4 GPU\(s\) visible \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        choose_gpu([0, 1, 4, 5], 0, 4, 4, visible_names="0,1,2,3")
    with pytest.raises(GpuMappingError, match="no CUDA device visible"):
        choose_gpu(None, 0, 1, 0)


def test_longer_list_leaves_the_rest_unused_with_a_note():
    index, note = choose_gpu([0, 1, 2, 3], 0, 2, 4)
    assert index == 0 and "--gpu 2 3 left unused" in note
    assert choose_gpu([0, 1, 2, 3], 1, 2, 4) == (1, None)


def test_srun_with_one_gpu_bound_per_task():
    # each task sees only its own GPU, as device 0; the seed gave "invalid device ordinal" on ranks >= 1
    for rank in range(4):
        assert choose_gpu(None, rank, 4, 1, per_task=True) == (0, None)
        index, note = choose_gpu([0, 1, 2, 3], rank, 4, 1, per_task=True, visible_names="0")
        assert index == 0 and (rank == 0 or "bound to it by srun" in note)
    env = {"SLURM_LOCALID": "2", "SLURM_PROCID": "6", "CUDA_VISIBLE_DEVICES": "0"}
    assert devices.bound_per_task(env)
    assert not devices.bound_per_task({**env, "LOCAL_RANK": "2"})       # torchrun inside Slurm
    assert not devices.bound_per_task({"SLURM_LOCALID": "2"})


# --- fault 6: numerics -----------------------------------------------------------------------------
@pytest.mark.parametrize("capability, want", [((6, 1), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                              ((9, 0), "bf16")])
def test_auto_dtype_on_cuda_follows_compute_capability(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on V100/T4 too
    assert default_dtype(torch.device("cuda", 0)) == want


def test_fp16_overflow_is_redone_in_fp32(fixtures_dir, caplog):
    """fp16 (the default on V100/T4) has a smaller range than bf16: a row whose fp16 embedding is not
    finite is recomputed in fp32 from its features instead of failing the file."""
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")

    def make(dtype):
        return Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype=dtype, max_chunk_frames=150)

    waves = [tone(s, seed=i) for i, s in enumerate([1.0, 0.6, 2.0])]  # 2.0 s: two chunks
    want = make("fp32").embed_waves(waves)
    embedder = make("fp16")
    forward = embedder.model.forward

    def overflowing(x, lengths=None):
        out = forward(x, lengths)
        if torch.is_autocast_enabled("cpu") and x.shape[0] > 1:  # the fp16 batch: row 1 overflows
            out = out.clone()
            out[1] = float("inf")
        return out

    embedder.model.forward = overflowing
    with caplog.at_level(logging.INFO, logger="speakerlab"):
        got = embedder.embed_waves(waves)
    assert all(r.error is None for r in got)
    np.testing.assert_allclose(got[1].embedding, want[1].embedding, rtol=1e-5, atol=1e-6)  # redone: fp32
    assert "redone in fp32" in caplog.text
    for i in (0, 2):
        assert np.dot(got[i].embedding, want[i].embedding) / (
            np.linalg.norm(got[i].embedding) * np.linalg.norm(want[i].embedding)) > 0.999


def _precision_state():
    return [getattr(obj, name) for obj, name, _ in devices._fp32_flags()]


def test_exact_fp32_turns_tf32_off_and_restores():
    before = _precision_state()
    with devices.exact_fp32():
        assert _precision_state() == [value for _, _, value in devices._fp32_flags()]
        assert "tf32" not in [str(v) for v in _precision_state()] and True not in _precision_state()
    assert _precision_state() == before
    with devices.exact_fp32(enabled=False):
        assert _precision_state() == before


def test_embedder_runs_in_exact_fp32_on_cuda_only(fixtures_dir, monkeypatch):
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    embedder = Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype="fp32")
    assert embedder.exact_fp32 is False  # CPU has no TF32 to turn off
    seen = []
    forward = embedder.model.forward
    embedder.model.forward = lambda x, lengths=None: (seen.append(_precision_state()), forward(x, lengths))[1]
    embedder.exact_fp32 = True  # what a CUDA embedder sets
    embedder.embed_waves([tone(1.0)])
    assert seen == [[value for _, _, value in devices._fp32_flags()]]


def test_fused_bias_stays_fp32_off_onednn_under_bf16(monkeypatch):
    """The CUDA path (conv, then the folded bias): a BatchNorm shift of 1 + 2**-10 cancels a conv
    output of -1. Rounded to bf16 the shift is 1.0 and the result 0; kept fp32 it is 2**-10."""
    from speakerlab.models import fusion
    monkeypatch.setattr(fusion, "mkldnn_available", lambda: False)  # what CUDA takes
    conv = torch.nn.Conv2d(1, 1, 1, bias=False).eval()
    bn = torch.nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        conv.weight.fill_(-1.0)
        bn.bias.fill_(1.0 + 2 ** -10)
        bn.running_var.fill_(1.0 - bn.eps)
    enable_fusion(torch.nn.Sequential(conv))
    x = torch.ones(1, 1, 2, 3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_bn(conv, bn, x)
    assert y.dtype == torch.bfloat16
    assert torch.all(y.float() == 2 ** -10), y
    _, bias = next(iter(conv.__dict__[fusion._CACHE][1].values()))
    assert bias.dtype == torch.float32


# --- fault 1: out of memory, retried after the handler -------------------------------------------
class FakeAllocator:
    """Device memory that stays taken while the block holding it lives, as a tensor's does: an
    exception's traceback that keeps a frame alive keeps that frame's blocks taken."""

    class Block:
        pass

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0

    def take(self, nbytes: int) -> "FakeAllocator.Block":
        if self.in_use + nbytes > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes "
                                         f"({self.in_use} of {self.capacity} in use)")
        self.in_use += nbytes
        block = self.Block()
        weakref.finalize(block, self._release, nbytes)
        return block

    def _release(self, nbytes: int) -> None:
        self.in_use -= nbytes


WAVES = [tone(s, seed=i, freq=150 + 30 * i) for i, s in enumerate([0.9, 1.4, 2.0, 1.1, 0.7, 1.8, 1.25])]


def test_oom_splits_once_with_the_failed_batch_released(fixtures_dir, caplog):
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")

    def make():
        return Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype="fp32")

    expected = make().embed_waves(WAVES)
    embedder = make()
    forward = embedder.model.forward
    unit = 1000
    t = -(-max(len(w) for w in WAVES) // 160)
    # two activations of (batch x frames) each: the whole batch needs 2 x 7 x T units, a half at most
    # 2 x 4 x T; the capacity fits a half, but not a half beside the failed batch's first activation
    allocator = FakeAllocator(capacity=int(1.5 * 7 * t * unit))
    calls = []

    def hungry(x, lengths=None):
        calls.append((x.shape[0], allocator.in_use))
        first = allocator.take(x.shape[0] * x.shape[1] * unit)   # noqa: F841 -- held by this frame
        second = allocator.take(x.shape[0] * x.shape[1] * unit)  # noqa: F841
        return forward(x, lengths)

    embedder.model.forward = hungry
    with caplog.at_level(logging.WARNING, logger="speakerlab"):
        results = embedder.embed_waves(WAVES)
    assert calls == [(7, 0), (3, 0), (4, 0)]  # one split, each half started with nothing held
    assert allocator.in_use == 0
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1
    for got, want in zip(results, expected):
        assert got.error is None
        np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-5)


# --- fault 4: the loop never reads a device value back ---------------------------------------------
class DeviceReads(TorchDispatchMode):
    """Records what would stall a GPU: reading a device tensor's value on the host, a device->host
    copy, or a blocking host->device copy. 'Device' here is the meta device, which holds no values:
    any read of one raises, so a loop that runs through on it reads nothing back."""

    def __init__(self):
        super().__init__()
        self.stalls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(("aten._to_copy", "aten.copy_")):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            dst_device = args[0].device if name.startswith("aten.copy_") else kwargs.get("device", src.device)
            if src.device.type == "meta" and torch.device(dst_device).type == "cpu":
                self.stalls.append(f"device->host copy {name}")
            if src.device.type == "cpu" and torch.device(dst_device).type == "meta" and not kwargs.get("non_blocking", False):
                self.stalls.append(f"blocking host->device copy {name} {tuple(src.shape)}")
        if name.startswith("aten._local_scalar_dense") and args[0].device.type != "cpu":
            self.stalls.append("value read back")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name, oom", [("campplus_tiny", False), ("eres2netv2_tiny", False), ("campplus_tiny", True)])
def test_batch_is_queued_without_reading_the_device(fixtures_dir, name, oom):
    config = load_config(fixtures_dir / name / "config.yaml")
    embedder = Embedder(load_model(config, fixtures_dir / name / "model.ckpt"), config,
                        torch.device("meta"), dtype="fp32", max_chunk_frames=150)
    if oom:  # the out-of-memory split reads nothing back either
        forward = embedder.model.forward

        def small_only(x, lengths=None):
            if x.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return forward(x, lengths)
        embedder.model.forward = small_only
    copies = []
    embedder._copy_back = lambda embeddings: (copies.append(tuple(embeddings.shape)),
                                              torch.zeros(embeddings.shape), None)[1:]
    waves = [tone(s, seed=i) for i, s in enumerate([1.0, 0.4, 0.7, 0.02, 2.0])]  # 0.02 s: too short; 2 s: chunked
    from speakerlab.batching import pad_waves
    batch, lengths = pad_waves(waves)
    with DeviceReads() as mode:
        pending = embedder.submit(batch, lengths)
    assert mode.stalls == []
    assert len(copies) == 1 and copies[0][0] == 4  # one copy back, of the 4 embedded rows
    results = pending.results()
    assert [r.error is None for r in results] == [True, True, True, False, True]
    assert results[3].error[0] == "validate" and results[4].chunks == 2


# --- fault 7: host memory for the batches in flight -----------------------------------------------
def test_default_shm_of_a_container_is_refused_in_one_line():
    from speakerlab.hostmem import HostMemoryError, plan_in_flight
    batch = 120000 * 160 * 4  # the GPU default: 77 MB of float32 audio
    with pytest.raises(HostMemoryError, match=r"^/dev/shm too small: 67 MB for 1 rank\(s\), and one batch .* is 77 MB; "
                                              r"give the container more \(docker run --shm-size=8g\)"):
        plan_in_flight(batch, 8, 4, 1, shm_free=64 * 2 ** 20)


def test_in_flight_batches_shrink_to_fit():
    from speakerlab.hostmem import plan_in_flight
    batch = 120000 * 160 * 4
    assert plan_in_flight(batch, 8, 4, 1, shm_free=64 * 10 ** 9) == (8, 4, None)   # plenty
    workers, prefetch, note = plan_in_flight(batch, 8, 4, 4, shm_free=4 * 10 ** 9)  # 1 GB per rank, half used
    assert workers * prefetch * batch <= 4 * 10 ** 9 / 4 / 2 and (workers, prefetch) == (6, 1)
    assert "instead of 8 x 4" in note
    workers, prefetch, _ = plan_in_flight(batch, 8, 4, 1, shm_free=64 * 10 ** 9, pinned=True,
                                          memory_limit=4 * 10 ** 9)                # pinned: 1 GB
    assert (workers, prefetch) == (8, 1)  # prefetch goes first: decode parallelism matters more
    assert plan_in_flight(batch, 0, 2, 1, shm_free=0) == (0, 2, None)              # no workers, no shm
    hour = 3600 * 16000 * 4  # a one-hour file is a batch of its own: 230 MB
    assert plan_in_flight(hour, 8, 4, 8, shm_free=4 * 10 ** 9)[:2] == (1, 1)      # fits a rank's share, alone


def test_shm_measured_and_mocked(monkeypatch):
    from speakerlab import hostmem
    assert hostmem.shm_free_bytes("/nonexistent/shm") is None
    monkeypatch.setattr(hostmem.shutil, "disk_usage", lambda path: type("U", (), {"free": 64 * 2 ** 20})())
    assert hostmem.shm_free_bytes() == 64 * 2 ** 20
    limit = hostmem.memory_limit_bytes()
    assert limit is None or limit > 2 ** 26
