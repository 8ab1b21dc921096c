"""The checkpoint manifest: the commit record of a checkpoint directory.

``checkpoint_manifest.json`` lists every file of the checkpoint (model shards
included) with its exact size and CRC32C, the state components and who wrote
them, the world size, a UTC timestamp and the versions that wrote it. It is
written last (see :mod:`ckptio.checkpoint.commit`), so its presence means the
checkpoint is complete. Every path in it is relative to the checkpoint
directory, so a checkpoint copied to another bucket or to local disk stays
valid.

A manifest is validated before it is trusted: wrong types, a format version
newer than this library understands, or a file path that leaves the directory
(absolute, a URL, ``..``) make it corrupt.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ckptio._version import __version__
from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    ObjectNotFoundError,
)
from ckptio.format import strict_json
from ckptio.storage import ObjectInfo, Storage, normalize_key
from ckptio.storage.integrity import FileRecord

__all__ = [
    "FORMAT_VERSION",
    "forget_manifests",
    "SHARING_PATTERN_VALUES",
    "CheckpointManifest",
    "ComponentManifest",
    "parse_timestamp",
    "read_manifest",
    "strict_json_loads",
    "utc_timestamp",
    "write_manifest",
]

#: Newest manifest format this library reads and the one it writes.
FORMAT_VERSION = 1
#: The values of ``ckptio.SharingPattern``, as stored in a manifest.
SHARING_PATTERN_VALUES = ("global", "per_rank", "replicated", "per_group", "per_node")
_CRC_DIGITS = frozenset("0123456789abcdef")


def utc_timestamp() -> str:
    """Return the current time as ISO-8601 UTC with microseconds (``2024-05-01T12:00:00.123456+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def parse_timestamp(value: str) -> _dt.datetime:
    """Parse an ISO-8601 timestamp into an aware UTC datetime (naive ones are taken as UTC).

    Raises:
        InvalidArgumentError: ``value`` is not an ISO-8601 timestamp.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"timestamp must be an ISO-8601 string, got {value!r}")
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgumentError(f"timestamp {value!r} is not ISO-8601") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.astimezone(_dt.timezone.utc)


def _relative_path(path: object, what: str) -> str:
    """Return ``path`` if it is a relative POSIX path inside the checkpoint, else raise."""
    if not isinstance(path, str) or not path:
        raise InvalidArgumentError(f"{what} must be a non-empty string, got {path!r}")
    escapes = (
        "://" in path
        or path.startswith(("/", "~"))
        or "\\" in path
        or (len(path) > 1 and path[1] == ":")
        or ".." in path.split("/")
    )
    if escapes or normalize_key(path) != path:
        raise InvalidArgumentError(f"{what} {path!r} is not a relative path inside the checkpoint directory")
    return path


def _int(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _str_or_none(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string or null, got {value!r}")
    return value


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{what} must be a list of ranks, got {value!r}")
    return [_int(v, what) for v in value]


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgumentError(f"{what} must be an object with string keys, got {value!r}")
    return value


def _file_record(value: object) -> FileRecord:
    if isinstance(value, FileRecord):
        record = value
    else:
        data = _dict(value, "file record")
        missing = {"path", "size", "crc32c"} - set(data)
        if missing:
            raise InvalidArgumentError(f"file record {data!r} lacks {sorted(missing)}")
        record = FileRecord(path=data["path"], size=data["size"], crc32c=data["crc32c"])
    _relative_path(record.path, "file path")
    _int(record.size, f"size of {record.path!r}")
    crc = record.crc32c
    if not isinstance(crc, str) or len(crc) != 8 or not set(crc) <= _CRC_DIGITS:
        raise InvalidArgumentError(f"crc32c of {record.path!r} must be 8 lowercase hex digits, got {crc!r}")
    return record


@dataclass(frozen=True)
class ComponentManifest:
    """One state component of a checkpoint and who wrote it.

    Attributes:
        key: the component's key (``"optimizer"``).
        sharing_pattern: a ``SharingPattern`` value (``"global"``, ``"per_rank"``, ...).
        ranks: the global ranks that wrote a file for it.
        replicated_across: for REPLICATED, the ranks holding identical copies.
        group_name: for PER_GROUP, the process group's name.
        size_bytes: total bytes of its files.
        checksum: a checksum over its files, when the writer computed one.
        metadata: the component's own metadata, copied from its ``StateComponent``.
        files: its files, relative to the checkpoint directory.
    """

    key: str
    sharing_pattern: str
    ranks: list[int]
    replicated_across: list[int] | None = None
    group_name: str | None = None
    size_bytes: int = 0
    checksum: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        pattern = self.sharing_pattern
        if isinstance(pattern, Enum):  # accept ckptio.SharingPattern itself
            object.__setattr__(self, "sharing_pattern", pattern.value)
        if not isinstance(self.key, str) or not self.key:
            raise InvalidArgumentError(f"component key must be a non-empty string, got {self.key!r}")
        if self.sharing_pattern not in SHARING_PATTERN_VALUES:
            raise InvalidArgumentError(
                f"component {self.key!r}: sharing_pattern must be one of {SHARING_PATTERN_VALUES}, "
                f"got {self.sharing_pattern!r}"
            )
        _int_list(self.ranks, f"component {self.key!r} ranks")
        if self.replicated_across is not None:
            _int_list(self.replicated_across, f"component {self.key!r} replicated_across")
        _str_or_none(self.group_name, f"component {self.key!r} group_name")
        _int(self.size_bytes, f"component {self.key!r} size_bytes")
        _str_or_none(self.checksum, f"component {self.key!r} checksum")
        _dict(self.metadata, f"component {self.key!r} metadata")
        if not isinstance(self.files, list):
            raise InvalidArgumentError(f"component {self.key!r} files must be a list, got {self.files!r}")
        for path in self.files:
            _relative_path(path, f"component {self.key!r} file")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this entry."""
        return {
            "key": self.key,
            "sharing_pattern": self.sharing_pattern,
            "ranks": list(self.ranks),
            "replicated_across": None if self.replicated_across is None else list(self.replicated_across),
            "group_name": self.group_name,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "metadata": self.metadata,
            "files": list(self.files),
        }

    @classmethod
    def from_json(cls, data: object) -> ComponentManifest:
        """Build an entry from its JSON object.

        Raises:
            InvalidArgumentError: a field is missing or has the wrong type.
        """
        obj = _dict(data, "component entry")
        missing = {"key", "sharing_pattern", "ranks"} - set(obj)
        if missing:
            raise InvalidArgumentError(f"component entry lacks {sorted(missing)}")
        return cls(
            key=obj["key"],
            sharing_pattern=obj["sharing_pattern"],
            ranks=obj["ranks"],
            replicated_across=obj.get("replicated_across"),
            group_name=obj.get("group_name"),
            size_bytes=obj.get("size_bytes", 0),
            checksum=obj.get("checksum"),
            metadata=obj.get("metadata", {}),
            files=obj.get("files", []),
        )


def _components_by_key(components: object) -> dict[str, ComponentManifest]:
    """Components keyed by their key, from a dict (checked) or a list of entries (older manifests)."""
    if isinstance(components, dict):
        entries = list(components.items())
        for key, entry in entries:
            if not isinstance(entry, ComponentManifest) or entry.key != key:
                raise InvalidArgumentError(f"components[{key!r}] must be a ComponentManifest with key {key!r}")
        return dict(entries)
    if not isinstance(components, list) or not all(isinstance(c, ComponentManifest) for c in components):
        raise InvalidArgumentError(f"components must be ComponentManifest entries, got {components!r}")
    keys = [c.key for c in components]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise InvalidArgumentError(f"components lists {duplicates} more than once")
    return {c.key: c for c in components}


@dataclass(frozen=True)
class CheckpointManifest:
    """The commit record of one checkpoint directory.

    Attributes:
        checkpoint_path: where the checkpoint sits relative to the output
            directory (``"checkpoints/checkpoint-7"``), or ``"."``; never absolute.
        world_size: number of ranks that saved it.
        timestamp: ISO-8601 UTC with microseconds (:func:`utc_timestamp`), the
            order of checkpoints.
        components: the state components and who wrote them, keyed by component
            key (the seed's ``Dict[str, ComponentManifest]``); a list of entries
            is accepted and keyed by their ``key``.
        format_version: manifest format (:data:`FORMAT_VERSION`).
        checkpoint_id: the step number, a name, or None.
        library_version: ckptio version that wrote it.
        torch_version: PyTorch version that wrote it.
        best_checkpoints: the best-checkpoint list at save time (JSON objects).
        files: every file of the checkpoint with size and CRC32C, paths relative.
        metadata: free-form JSON metadata.
    """

    checkpoint_path: str
    world_size: int
    timestamp: str
    components: dict[str, ComponentManifest] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checkpoint_id: int | str | None = None
    library_version: str = __version__
    torch_version: str = torch.__version__
    best_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.checkpoint_path != ".":
            _relative_path(self.checkpoint_path, "checkpoint_path")
        _int(self.world_size, "world_size", minimum=1)
        parse_timestamp(self.timestamp)
        version = _int(self.format_version, "format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise InvalidArgumentError(
                f"format_version {version} is newer than this ckptio ({__version__}) understands "
                f"(at most {FORMAT_VERSION}); upgrade ckptio to read it"
            )
        ident = self.checkpoint_id
        if ident is not None and (isinstance(ident, bool) or not isinstance(ident, int | str)):
            raise InvalidArgumentError(f"checkpoint_id must be an int, a string or null, got {ident!r}")
        for name in ("library_version", "torch_version"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"{name} must be a string, got {getattr(self, name)!r}")
        for what in ("best_checkpoints", "files"):
            if not isinstance(getattr(self, what), list):
                raise InvalidArgumentError(f"{what} must be a list, got {getattr(self, what)!r}")
        object.__setattr__(self, "components", _components_by_key(self.components))
        for entry in self.best_checkpoints:
            _dict(entry, "best_checkpoints entry")
        _dict(self.metadata, "metadata")
        object.__setattr__(self, "files", [_file_record(r) for r in self.files])
        paths = [r.path for r in self.files]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        if duplicates:
            raise InvalidArgumentError(f"files lists {duplicates} more than once")
        reserved = {MANIFEST_NAME, IN_PROGRESS_NAME} & set(paths)
        if reserved:
            raise InvalidArgumentError(f"files must not list the commit objects {sorted(reserved)}")

    @property
    def total_size(self) -> int:
        """Sum of the sizes of every listed file."""
        return sum(r.size for r in self.files)

    def file_record(self, path: str) -> FileRecord | None:
        """The record of ``path``, or None when the manifest does not list it."""
        return next((r for r in self.files if r.path == path), None)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this manifest."""
        return {
            "format_version": self.format_version,
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_id": self.checkpoint_id,
            "world_size": self.world_size,
            "timestamp": self.timestamp,
            "library_version": self.library_version,
            "torch_version": self.torch_version,
            "components": {key: c.to_json() for key, c in self.components.items()},
            "best_checkpoints": self.best_checkpoints,
            "files": [r.to_json() for r in self.files],
            "metadata": self.metadata,
        }

    def to_bytes(self) -> bytes:
        """Return the manifest as indented UTF-8 JSON."""
        return (json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: object, *, url: str = MANIFEST_NAME) -> CheckpointManifest:
        """Build a manifest from its JSON object, or from raw JSON text/bytes.

        Raises:
            CorruptCheckpointError: malformed JSON, a missing or mistyped field,
                a format version newer than this library, or a file path that
                leaves the checkpoint directory. The message names ``url``.
        """
        try:
            if isinstance(data, bytes | str):
                data = strict_json_loads(data)
            obj = _dict(data, "manifest")
            missing = {"checkpoint_path", "world_size", "timestamp", "format_version"} - set(obj)
            if missing:
                raise InvalidArgumentError(f"required fields {sorted(missing)} are missing")
            components = obj.get("components", {})
            files = obj.get("files", [])
            if not isinstance(components, dict | list) or not isinstance(files, list):
                raise InvalidArgumentError("'components' must be an object (or a list) and 'files' a list")
            if isinstance(components, dict):  # keyed by component key; older manifests hold a list
                parsed: object = {k: ComponentManifest.from_json(c) for k, c in _dict(components, "components").items()}
            else:
                parsed = [ComponentManifest.from_json(c) for c in components]
            return cls(
                checkpoint_path=obj["checkpoint_path"],
                world_size=obj["world_size"],
                timestamp=obj["timestamp"],
                components=_components_by_key(parsed),
                format_version=obj["format_version"],
                checkpoint_id=obj.get("checkpoint_id"),
                library_version=obj.get("library_version", ""),
                torch_version=obj.get("torch_version", ""),
                best_checkpoints=obj.get("best_checkpoints", []),
                files=[_file_record(r) for r in files],
                metadata=obj.get("metadata", {}),
            )
        except ValueError as exc:  # bad JSON or UTF-8, a duplicate key, a wrong field (InvalidArgumentError)
            raise CorruptCheckpointError(
                f"cannot read manifest {url!r}: {exc}; the checkpoint is not trusted and nothing was changed"
            ) from exc


def strict_json_loads(raw: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity``, duplicate keys and runaway nesting.

    Raises:
        ValueError: malformed JSON, bytes that are not UTF-8, a non-finite
            number, a key given twice in one object, or nesting too deep.
    """
    return strict_json.loads(raw)


class _ManifestCache:
    """Parsed manifests of this process, keyed by URL and the listed identity of the object.

    A committed manifest is never rewritten in place (a checkpoint is
    immutable once committed), so a manifest whose URL, size, modification
    time and version token match a listing is the one read before: discovery
    reads each checkpoint's manifest once per process, not once per save.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[object, ...], CheckpointManifest] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> CheckpointManifest | None:
        with self._lock:
            manifest = self._entries.get(key)
            if manifest is not None:
                self._entries.move_to_end(key)
            return manifest

    def put(self, key: tuple[object, ...], manifest: CheckpointManifest) -> None:
        with self._lock:
            self._entries[key] = manifest
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_MANIFESTS = _ManifestCache()


def forget_manifests() -> None:
    """Forget every manifest this process has read (the next discovery reads them again)."""
    _MANIFESTS.clear()


def read_manifest(storage: Storage, *, listed: ObjectInfo | None = None) -> CheckpointManifest | None:
    """Read the manifest at the root of a checkpoint directory.

    Args:
        storage: the checkpoint directory.
        listed: the manifest's entry from a listing the caller already made.
            With it, a manifest this process has already read (same URL, size,
            modification time and version) is returned without a request.

    Returns:
        The manifest, or None when the directory has none (not committed).

    Raises:
        CorruptCheckpointError: the manifest exists but is malformed; the
            message names its URL.
    """
    url = storage.url_of(MANIFEST_NAME)
    identity = listed.identity() if listed is not None else None
    cache_key = (url, *identity) if identity is not None else None
    if cache_key is not None:
        cached = _MANIFESTS.get(cache_key)
        if cached is not None:
            return cached
    try:
        # An explicit open range: one GET, without the size lookup some clients make before a whole read.
        raw = storage.read_bytes(MANIFEST_NAME, 0)
    except ObjectNotFoundError:
        return None
    manifest = CheckpointManifest.from_json(raw, url=url)
    if cache_key is not None and listed is not None and len(raw) == listed.size:
        _MANIFESTS.put(cache_key, manifest)
    return manifest


def write_manifest(storage: Storage, manifest: CheckpointManifest) -> None:
    """Publish ``manifest`` atomically at the root of the checkpoint directory.

    Writing the manifest commits the checkpoint; call it only after every file
    it lists is written (normally through :func:`~ckptio.checkpoint.commit.commit_checkpoint`).
    """
    storage.write_bytes(MANIFEST_NAME, manifest.to_bytes())
