import errno
import os
import subprocess
import sys
import textwrap

import pytest
import xxhash

from torchckpt._fileio import (
    HashingWriter,
    atomic_writer,
    checksum_file,
    write_bytes_atomic,
)
from torchckpt.errors import WriteError
from torchckpt.layout import is_tmp_name


def test_atomic_writer_publishes_only_on_success(tmp_path):
    final = tmp_path / "f.bin"
    with atomic_writer(final) as w:
        w.write(b"hello ")
        w.write(memoryview(b"world"))
        assert not final.exists(), "the final name must not exist before the block completes"
        assert [p for p in tmp_path.iterdir() if is_tmp_name(p.name)], "bytes go to a temporary name"
    assert final.read_bytes() == b"hello world"
    assert w.result.size == 11
    assert w.result.checksum == "xxh3_128:" + xxhash.xxh3_128(b"hello world").hexdigest()
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_writer_failure_keeps_old_file_and_removes_tmp(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_writer(final) as w:
        w.write(b"new partial")
        raise RuntimeError("boom")
    assert final.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [final]


def test_checksum_file_matches_streaming_hash(tmp_path):
    data = os.urandom(3 << 20) + b"tail"
    written = write_bytes_atomic(tmp_path / "x", data)
    assert checksum_file(tmp_path / "x") == (len(data), written.checksum)
    (tmp_path / "empty").write_bytes(b"")
    assert checksum_file(tmp_path / "empty")[0] == 0


def test_hashing_writer_counts_multibyte_views(tmp_path):
    import array

    with open(tmp_path / "raw", "wb") as raw:
        w = HashingWriter(raw)
        w.write(array.array("d", [1.0, 2.0]))
    assert w.size == 16 and (tmp_path / "raw").stat().st_size == 16


def test_file_too_large_is_a_clear_write_error(tmp_path):
    # RLIMIT_FSIZE in a child process: the kernel refuses writes past 64 KiB (EFBIG).
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        from pathlib import Path
        from torchckpt._fileio import atomic_writer
        from torchckpt.errors import WriteError
        root = Path({str(tmp_path)!r})
        try:
            with atomic_writer(root / "big") as w:
                w.write(b"x" * 200_000)
        except WriteError as e:
            print("ERR", e.errno, e)
            sys.exit(0)
        sys.exit("no error")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"ERR {errno.EFBIG}" in out.stdout
    assert "file too large" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temporary file may be left behind"


def test_unwritable_directory_is_a_write_error(tmp_path):
    if os.geteuid() == 0:
        missing = tmp_path / "no" / "such" / "dir" / "f"
        with pytest.raises(WriteError, match="writing .* failed|cannot write"), atomic_writer(missing) as w:
            w.write(b"x")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(WriteError, match="cannot write"), atomic_writer(ro / "f") as w:
            w.write(b"x")


def test_hashing_writer_starts_write_out_as_it_goes(tmp_path, monkeypatch):
    import torchckpt._fileio as fileio

    started = []
    monkeypatch.setattr(fileio, "_start_writeback", lambda fd, offset, n: started.append((offset, n)))
    data = os.urandom(10_000)
    with atomic_writer(tmp_path / "f", writeback_every=4096) as w:
        w.write(b"x" * 100)
        w.write(memoryview(data))  # larger than the interval: split, write-out started inside it
    assert (tmp_path / "f").read_bytes() == b"x" * 100 + data
    assert w.result.checksum == "xxh3_128:" + xxhash.xxh3_128(b"x" * 100 + data).hexdigest()
    assert started == [(0, 4196), (4196, 4096)], "each range once, in order, while writing"


def test_sync_file_range_is_found_on_linux():
    import torchckpt._fileio as fileio

    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert callable(fileio._load_sync_file_range())
