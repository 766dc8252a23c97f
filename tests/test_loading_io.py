"""nf4.loading.io: both I/O strategies against safetensors' own loader, bad files, the strategy
switch, the mmap fallback, and anonymous memory of a CPU load. CPU unless marked gpu."""
import errno
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4.loading import io
from nf4.loading.checkpoint import DTYPES, Checkpoint, read_header

STRATEGIES = ("auto", "mmap", "read")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu()


def write_raw(path, tensors, data_start_mod8: int) -> None:
    """A safetensors file written by hand: tensors back to back (a 1-byte tensor first puts the
    rest at odd offsets), the header padded with spaces so the data starts at ``8k + mod8``."""
    header, pos = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * ((data_start_mod8 - 8 - len(raw)) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(t[3] for t in tensors))


def every_dtype_tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tensors = [("lead_byte", "U8", [1], b"\x07")]
    for i, (name, dtype) in enumerate(sorted(DTYPES.items())):
        for shape in ([3, 5], [], [0, 4], [7]):
            n = torch.Size(shape).numel() * dtype.itemsize
            data = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=gen)
            tensors.append((f"t{i}.{name}.{len(shape)}.{n}", name, shape, data.numpy().tobytes()))
    return tensors


def stream(entries, strategy, with_destination=False, device="cpu"):
    dest = (lambda e: torch.empty(e.shape, dtype=e.dtype, device=device)) if with_destination else None
    return {e.name: t for e, t in io.stream_tensors(entries, device, dest, strategy=strategy)}


def assert_same_bytes(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert torch.equal(as_bytes(ours[name]), as_bytes(t)), name


# ------------------------------------------------------------------------------- same bytes
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("with_destination", [False, True])
def test_fixture_checkpoint_matches_safetensors(fixtures, strategy, with_destination):
    ckpt = Checkpoint(fixtures / "tiny_llama_bf16")
    theirs = {}
    for shard in ckpt.shards:
        theirs.update(load_file(str(shard)))
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16}  # what the fixture holds
    assert_same_bytes(stream(ckpt.entries.values(), strategy, with_destination), theirs)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("data_start_mod8", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("with_destination", [False, True])
def test_every_dtype_at_odd_offsets_matches_safetensors(tmp_path, strategy, data_start_mod8, with_destination):
    path = tmp_path / "model.safetensors"
    write_raw(path, every_dtype_tensors(data_start_mod8), data_start_mod8)
    entries, _ = read_header(path)
    # The file holds misaligned tensors (they are copied), and aligned ones (they may be views).
    assert {e.offset % e.dtype.itemsize == 0 for e in entries.values() if e.dtype.itemsize > 1} == {True, False}
    assert_same_bytes(stream(entries.values(), strategy, with_destination), load_file(str(path)))


def test_cpu_mmap_views_are_private(tmp_path):
    """An aligned tensor comes back as a view of the map (no copy); writing to it changes a
    private copy of the page, never the file (MAP_PRIVATE)."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    entries, _ = read_header(path)
    (entry, t), = io.stream_tensors(entries.values(), "cpu", strategy="mmap")
    # A view: its bytes sit at the entry's offset from a page-aligned base (the map's). A copy
    # would be at a 64-byte-aligned address, and this offset is not a multiple of 64.
    assert entry.offset % 64 and (t.data_ptr() - entry.offset) % mmap.PAGESIZE == 0
    t.fill_(-1.0)
    assert torch.equal(load_file(str(path))["w"], torch.arange(4096, dtype=torch.float32))


# ------------------------------------------------------------------------------- bad files
def _two_shards(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight_map = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        tensors = {f"s{i}.a": torch.randn(64, 64), f"s{i}.b": torch.randn(256, 64)}
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_truncated_after_validation(tmp_path, strategy):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    shard = folder / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: tensor 's2.b' .*truncated or "
                                         r"changed after its header was validated"):
        stream(ckpt.entries.values(), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_truncated_while_streaming(tmp_path, strategy):
    """The shard loses its data after the first tensor was handed out: a ValueError, no SIGBUS
    (the mmap path checks the size before touching the map again)."""
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    shard = folder / "model-00001-of-00002.safetensors"
    entries = sorted((e for e in ckpt.entries.values() if e.shard == shard), key=lambda e: e.offset)
    it = io.stream_tensors(entries, "cpu", strategy=strategy)
    first, _ = next(it)  # the tensor itself is dropped: a view of a truncated page must not be read
    os.truncate(shard, entries[1].offset + 10)
    with pytest.raises(ValueError, match=rf"tensor {entries[1].name!r} .*(truncated|past the end)"):
        next(it)


def test_shard_replaced_by_shorter_file(tmp_path):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    shard = folder / "model-00001-of-00002.safetensors"
    save_file({"s1.a": torch.randn(2, 2)}, str(shard))
    with pytest.raises(ValueError, match="changed after its header was validated"):
        stream(ckpt.entries.values(), "mmap")


def test_deleted_shard_is_a_clear_error(tmp_path):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        stream(ckpt.entries.values(), "mmap")


# ------------------------------------------------------------------------------- the switch
def _fail(what):
    def fail(*args, **kwargs):
        raise OSError(errno.ENODEV, f"{what} called")
    return fail


def test_forced_read_never_maps(tmp_path, monkeypatch):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    theirs = {k: v for s in ckpt.shards for k, v in load_file(str(s)).items()}
    monkeypatch.setattr(mmap, "mmap", _fail("mmap"))
    monkeypatch.setenv(io.STRATEGY_ENV, "read")
    assert_same_bytes(stream(ckpt.entries.values(), None), theirs)


@pytest.mark.parametrize("with_destination", [False, True])
def test_forced_mmap_never_reads(tmp_path, monkeypatch, with_destination):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    theirs = {k: v for s in ckpt.shards for k, v in load_file(str(s)).items()}
    monkeypatch.setattr(os, "preadv", _fail("preadv"))
    monkeypatch.setenv(io.STRATEGY_ENV, "mmap")
    assert_same_bytes(stream(ckpt.entries.values(), None, with_destination), theirs)
    # The argument wins over the environment.
    with pytest.raises(OSError, match="preadv called"):
        stream(ckpt.entries.values(), "read")


def test_unknown_strategy(monkeypatch):
    with pytest.raises(ValueError, match=r"strategy must be one of \['auto', 'mmap', 'read'\], got 'fast'"):
        io.resolve_strategy("fast")
    monkeypatch.setenv(io.STRATEGY_ENV, "MMAP")
    with pytest.raises(ValueError, match=r"NF4_LOAD_IO must be one of .* got 'MMAP'"):
        io.resolve_strategy()
    monkeypatch.delenv(io.STRATEGY_ENV)
    assert io.resolve_strategy() == "auto"


def test_mmap_failure_falls_back_to_read_with_one_log_line(tmp_path, monkeypatch, caplog):
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    theirs = {k: v for s in ckpt.shards for k, v in load_file(str(s)).items()}
    monkeypatch.setattr(mmap, "mmap", _fail("mmap"))
    with caplog.at_level(logging.WARNING, logger="nf4.loading.io"):
        assert_same_bytes(stream(ckpt.entries.values(), "auto"), theirs)
    lines = [r for r in caplog.records if r.name == "nf4.loading.io"]
    assert len(lines) == 1 and "cannot be memory-mapped" in lines[0].getMessage()
    # Forced, the same failure is an error rather than a silent change of strategy.
    with pytest.raises(OSError, match="cannot be memory-mapped .*NF4_LOAD_IO=mmap forces mmap"):
        stream(ckpt.entries.values(), "mmap")


def test_auto_reads_chunks_not_in_the_page_cache(tmp_path, monkeypatch):
    """auto: a chunk whose first page is cached is copied from the map, any other is pread."""
    folder = _two_shards(tmp_path)
    ckpt = Checkpoint(folder)
    theirs = {k: v for s in ckpt.shards for k, v in load_file(str(s)).items()}
    preads = []
    real_pread_into = io._pread_into
    monkeypatch.setattr(io, "_pread_into", lambda *a: preads.append(a[3].name) or real_pread_into(*a))
    for cached in (True, False):
        preads.clear()
        monkeypatch.setattr(io, "_cached", lambda fd, offset: cached)
        assert_same_bytes(stream(ckpt.entries.values(), "auto", with_destination=True), theirs)
        assert sorted(preads) == ([] if cached else sorted(theirs))


def test_cached_probe(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1 << 20)
        assert io._cached(fd, 4096)
        monkeypatch.setattr(os, "preadv", _fail("preadv"))  # a filesystem refusing RWF_NOWAIT
        assert io._cached(fd, 4096)

        def would_block(*args):
            raise BlockingIOError(errno.EAGAIN, "not cached")
        monkeypatch.setattr(os, "preadv", would_block)
        assert not io._cached(fd, 4096)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- memory
RSS_CHILD = textwrap.dedent("""
    import json, sys, torch
    from nf4.loading import io
    from nf4.loading.checkpoint import Checkpoint

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    entries = list(Checkpoint(sys.argv[1]).entries.values())
    base = peak = rss_anon()
    for entry, t in io.stream_tensors(entries, "cpu", strategy=sys.argv[2]):
        int(t.view(torch.uint8).reshape(-1)[::4096].sum())  # touch every page of the tensor
        peak = max(peak, rss_anon())
        del t
    print(json.dumps({"over_start": peak - base}))
""")

TENSOR_BYTES = 32 * 2**20


def test_cpu_load_anonymous_memory(tmp_path):
    """256 MB in 8 tensors of 32 MiB over 2 shards, each touched and dropped in turn: read()
    holds one tensor in anonymous memory at a time, mmap none (its pages are page cache)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight_map = {}
    for s in range(2):
        name = f"model-0000{s + 1}-of-00002.safetensors"
        tensors = {f"s{s}.w{i}": torch.full((TENSOR_BYTES // 2,), float(i), dtype=torch.bfloat16) for i in range(4)}
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    over = {}
    for strategy in STRATEGIES:
        proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), strategy],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        over[strategy] = json.loads(proc.stdout.strip().splitlines()[-1])["over_start"]
    # read(): the tensor held, every page touched. mmap and auto (views on the CPU): no tensor's
    # bytes in anonymous memory;
    # 8 MiB covers allocator and interpreter noise (measured: under 1 MiB).
    assert over["read"] >= TENSOR_BYTES, over
    assert over["mmap"] < 8 * 2**20 and over["auto"] < 8 * 2**20, over


MODEL_CHILD = textwrap.dedent("""
    import os, sys, torch
    import nf4.loading
    from nf4.loading.checkpoint import Checkpoint

    models = []
    for folder in sys.argv[1:]:
        models.append(nf4.loading.from_pretrained(folder, device="cpu", progress=False))
        for shard in Checkpoint(folder).shards:
            os.truncate(shard, 0)
    ids = torch.tensor([[1, 2, 3]])
    for model in models:
        with torch.no_grad():
            model(ids)
        for t in model.state_dict().values():
            t.float().sum()
    print("ok")
""")


def test_cpu_model_keeps_no_mapped_pages(fixtures, tmp_path):
    """Every tensor a CPU model keeps has its own memory: truncating the shards after the load
    (which would make a read of any mapped page SIGBUS) leaves the model usable."""
    folders = []
    for name in ("tiny_llama_bf16", "tiny_llama_bnb4"):
        folders.append(tmp_path / name)
        shutil.copytree(fixtures / name, folders[-1])
    env = dict(os.environ, NF4_LOAD_IO="mmap")
    proc = subprocess.run([sys.executable, "-c", MODEL_CHILD, *map(str, folders)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------------------- GPU
class _NoEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("with_destination", [False, True])
@pytest.mark.parametrize("chunk", [io.STAGING_CHUNK_BYTES, 4099, 7])
def test_staging_pipeline_logic_on_cpu(tmp_path, monkeypatch, strategy, with_destination, chunk):
    """The CUDA pipeline (chunking, reader threads, slot reuse, order, empty tensors) run with
    CPU stand-ins for pinned memory and CUDA events, so it is checked where there is no GPU."""
    real_empty = torch.empty
    fake_torch = type(sys)("fake_torch")
    fake_torch.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake_torch.empty = lambda *a, pin_memory=False, **k: real_empty(*a, **k)
    fake_torch.cuda = type(sys)("fake_cuda")
    fake_torch.cuda.Event = _NoEvent
    fake_torch.cuda.current_stream = lambda device=None: None  # the events' stream (record(stream))
    monkeypatch.setattr(io, "torch", fake_torch)
    monkeypatch.setattr(io, "STAGING_CHUNK_BYTES", chunk)
    path = tmp_path / "model.safetensors"
    write_raw(path, every_dtype_tensors(1) + [("big", "BF16", [3, 40001], os.urandom(3 * 40001 * 2))], 3)
    entries = list(read_header(path)[0].values())
    shards = io._Shards(entries, strategy)
    dest = (lambda e: real_empty(e.shape, dtype=e.dtype)) if with_destination else None
    try:
        ours = {e.name: t for e, t in io._stream_cuda(entries, torch.device("cpu"), dest, None, shards)}
    finally:
        shards.close()
    assert list(ours) == [e.name for e in entries]  # handed out in order
    assert_same_bytes(ours, load_file(str(path)))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("with_destination", [False, True])
@pytest.mark.parametrize("chunk", [io.STAGING_CHUNK_BYTES, 4099])
def test_cuda_every_dtype_matches_safetensors(tmp_path, monkeypatch, strategy, with_destination, chunk):
    """The pinned pipeline, including tensors split over many odd-sized chunks."""
    monkeypatch.setattr(io, "STAGING_CHUNK_BYTES", chunk)
    path = tmp_path / "model.safetensors"
    tensors = every_dtype_tensors(1) + [("big", "BF16", [3, 40001], os.urandom(3 * 40001 * 2))]
    write_raw(path, tensors, 3)
    entries, _ = read_header(path)
    ours = stream(entries.values(), strategy, with_destination, device="cuda")
    assert all(t.device.type == "cuda" for t in ours.values())
    assert_same_bytes(ours, load_file(str(path)))
