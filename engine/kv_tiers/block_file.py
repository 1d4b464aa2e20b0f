"""The disk tier's file format: one KV block per file, checksummed, written atomically.

Layout of ``<root>/<fingerprint>/<hh>/<block hash, 32 hex>.kvb``::

    MAGIC (6 bytes) | header length (u32 LE) | header (JSON) | payload | xxh3-64 (u64 LE)

The header names the fingerprint, the block's hash, parent hash and tokens, its lifetime
and its last use (wall-clock seconds, so a restarted engine can tell how old it is); the
payload is the block's KV as stored in host memory, ``(L, 2, bs, H_kv, D)``. The checksum
covers header and payload. A file is written under a unique temporary name and renamed
into place, so readers see a whole file or none; a file that is short, fails its checksum
or names another fingerprint or hash is refused (:class:`BlockFileError`), never loaded.
The file's mtime is set to the block's last use: the disk budget evicts oldest first.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import xxhash

from engine.block_hash import BlockHash

MAGIC = b"KVFB1\n"
SUFFIX = ".kvb"
_LEN = struct.Struct("<I")
_SUM = struct.Struct("<Q")
_MAX_HEADER = 1 << 20


class BlockFileError(Exception):
    """A block file that must not be loaded (missing, partial, corrupt or foreign)."""


@dataclass(frozen=True, slots=True)
class BlockFileHeader:
    """What a block file says about its block."""

    fingerprint: str
    block_hash: BlockHash
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    # Lifetime (sliding TTL) of the block, seconds; math.inf for a pinned block.
    ttl_s: float
    # Wall-clock time (time.time()) of the block's last use.
    last_used_wall: float
    payload_nbytes: int

    def encode(self) -> bytes:
        return json.dumps({
            "fingerprint": self.fingerprint,
            "hash": f"{self.block_hash:032x}",
            "parent": None if self.parent_hash is None else f"{self.parent_hash:032x}",
            "tokens": list(self.token_ids),
            "ttl_s": None if math.isinf(self.ttl_s) else self.ttl_s,
            "last_used_wall": self.last_used_wall,
            "payload_nbytes": self.payload_nbytes,
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BlockFileHeader:
        try:
            d = json.loads(raw)
            return cls(
                fingerprint=str(d["fingerprint"]),
                block_hash=int(d["hash"], 16),
                parent_hash=None if d["parent"] is None else int(d["parent"], 16),
                token_ids=tuple(int(t) for t in d["tokens"]),
                ttl_s=math.inf if d["ttl_s"] is None else float(d["ttl_s"]),
                last_used_wall=float(d["last_used_wall"]),
                payload_nbytes=int(d["payload_nbytes"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise BlockFileError(f"unreadable header: {e}") from e

    def file_nbytes(self) -> int:
        return len(MAGIC) + _LEN.size + len(self.encode()) + self.payload_nbytes + _SUM.size


def block_path(directory: Path, block_hash: BlockHash) -> Path:
    """Where the block with ``block_hash`` lives under one fingerprint's directory."""
    name = f"{block_hash:032x}"
    return directory / name[:2] / (name + SUFFIX)


def hash_of_path(path: Path) -> BlockHash | None:
    """The block hash a file name encodes (None for anything else)."""
    if path.suffix != SUFFIX or len(path.stem) != 32:
        return None
    try:
        return int(path.stem, 16)
    except ValueError:
        return None


def write_block_file(path: Path, header: BlockFileHeader, payload: memoryview) -> int:
    """Write a block file atomically (temp file + rename); return its size in bytes."""
    raw = header.encode()
    if len(payload) != header.payload_nbytes:
        raise ValueError(f"payload is {len(payload)} bytes, header says {header.payload_nbytes}")
    digest = xxhash.xxh3_64(raw)
    digest.update(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(_LEN.pack(len(raw)))
            f.write(raw)
            f.write(payload)
            f.write(_SUM.pack(digest.intdigest()))
        os.utime(tmp, (header.last_used_wall, header.last_used_wall))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(MAGIC) + _LEN.size + len(raw) + len(payload) + _SUM.size


def read_header(path: Path) -> BlockFileHeader:
    """The header of a block file, after checking its size matches (payload not verified)."""
    try:
        with open(path, "rb") as f:
            header, _ = _read_head(f)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise BlockFileError(f"cannot read {path.name}: {e}") from e
    if size != header.file_nbytes():
        raise BlockFileError(f"{path.name} is {size} bytes, expected {header.file_nbytes()} (partial write?)")
    return header


def read_block_file(
    path: Path, fingerprint: str, block_hash: BlockHash, payload_nbytes: int
) -> tuple[BlockFileHeader, bytearray]:
    """Header and payload of a block file, verified end to end (``BlockFileError`` otherwise)."""
    try:
        with open(path, "rb") as f:
            header, raw = _read_head(f)
            payload = bytearray(header.payload_nbytes)
            got = f.readinto(payload)
            tail = f.read(_SUM.size + 1)
    except OSError as e:
        raise BlockFileError(f"cannot read {path.name}: {e}") from e
    if header.fingerprint != fingerprint or header.block_hash != block_hash:
        raise BlockFileError(f"{path.name} belongs to another model or block")
    if header.payload_nbytes != payload_nbytes or got != payload_nbytes or len(tail) != _SUM.size:
        raise BlockFileError(f"{path.name} is truncated or has the wrong block size")
    digest = xxhash.xxh3_64(raw)
    digest.update(payload)
    if _SUM.unpack(tail)[0] != digest.intdigest():
        raise BlockFileError(f"{path.name} fails its checksum")
    return header, payload


def _read_head(f) -> tuple[BlockFileHeader, bytes]:  # noqa: ANN001 - a binary file object
    if f.read(len(MAGIC)) != MAGIC:
        raise BlockFileError("not a kvferry block file")
    n = f.read(_LEN.size)
    if len(n) != _LEN.size or not 0 < _LEN.unpack(n)[0] <= _MAX_HEADER:
        raise BlockFileError("bad header length")
    raw = f.read(_LEN.unpack(n)[0])
    if len(raw) != _LEN.unpack(n)[0]:
        raise BlockFileError("truncated header")
    return BlockFileHeader.decode(raw), raw
