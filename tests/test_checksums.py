"""Checksums of checkpoint files: CRC-32 through a memory map in chunks, and verification that
names each missing, truncated or altered file."""

import os
import zlib

from llama_jax import checksums


def test_file_crc32_matches_zlib_across_chunks(tmp_path, monkeypatch):
    data = os.urandom(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(checksums, "_CHUNK", 4096)  # three chunks, the last one partial
    assert checksums.file_crc32(str(path)) == zlib.crc32(data)
    (tmp_path / "empty").write_bytes(b"")
    assert checksums.file_crc32(str(tmp_path / "empty")) == 0


def test_verify_names_each_damaged_file(tmp_path):
    for rel in ("state/a", "state/d/b", "state/d/c", "data/process_0-of-1.json"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(os.urandom(1000))
    record = checksums.write(str(tmp_path), ("state", "data"), extra={"run_config": {"x": 1}})
    assert checksums.read(str(tmp_path)) == record and record["run_config"] == {"x": 1}
    assert checksums.verify(str(tmp_path), record) == []
    raw = bytearray((tmp_path / "state/d/b").read_bytes())
    raw[500] ^= 0x10  # one bit
    (tmp_path / "state/d/b").write_bytes(bytes(raw))
    with open(tmp_path / "state/a", "r+b") as f:
        f.truncate(999)
    os.remove(tmp_path / "data/process_0-of-1.json")
    assert checksums.verify(str(tmp_path), record, under="state/") == [
        "state/a has 999 bytes, not the 1000 saved",
        "state/d/b does not match the checksum saved with it"]
    assert checksums.verify(str(tmp_path), record, names={"data/process_0-of-1.json"}) == [
        "data/process_0-of-1.json is missing"]
    assert checksums.read(str(tmp_path / "state")) is None  # no record: an older step
