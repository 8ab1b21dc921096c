"""How S3 and GCS turn uploaded parts into one object (the :class:`PartSink` of each).

* **S3**: a multipart upload. Parts go up as concurrent ``UploadPart``
  requests; ``CompleteMultipartUpload`` publishes the object atomically and
  ``AbortMultipartUpload`` discards it. Parts of an upload never show in
  listings, and a killed writer's parts are removed by the bucket's
  ``AbortIncompleteMultipartUpload`` lifecycle rule.
* **GCS**: a parallel composite upload. gcsfs exposes neither the XML
  multipart API nor a resumable session that takes parts out of order, so
  each part is uploaded as a temporary object beside the target, the parts
  are composed (32 sources per ``compose`` request, in a tree for more) into
  the target in one atomic step, and the temporaries are deleted. Their
  names start with :data:`~ckptio.storage.base.TEMP_PREFIX` (listings skip
  them) and end with :data:`PART_SUFFIX`, which a lifecycle rule
  (``matchesSuffix``) can collect if a writer is killed. Composite objects
  carry a CRC32C but no MD5; ckptio's manifest holds its own CRC32C of every
  file. A compose request takes 32 sources, so GCS parts start at 8 MiB (a
  small object still goes out over several connections) and grow to 16 and
  32 MiB after every 8 parts: objects up to about 700 MiB compose in one
  request.

Both sinks send an object that fits in one part as one plain upload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any
from urllib.parse import quote

from ckptio.storage.base import TEMP_PREFIX
from ckptio.storage.multipart import PartSink
from ckptio.storage.view_file import ViewFile

__all__ = ["PART_SUFFIX", "GCSComposeSink", "S3MultipartSink", "default_part_size", "part_sink_for"]

#: Name ending of GCS temporary part objects (for a ``matchesSuffix`` lifecycle rule).
PART_SUFFIX = ".ckptio-part"
#: Part size of streaming uploads by protocol (S3 accepts >= 5 MiB; GCS wants multiples of 256 KiB).
_PART_SIZES: dict[str, int] = {}
_DEFAULT_PART_SIZE = 8 * 2**20

#: Most source objects one GCS compose request accepts.
_COMPOSE_FANIN = 32
logger = logging.getLogger(__name__)


class S3MultipartSink(PartSink):
    """One object uploaded through an S3 multipart upload (s3fs's client)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        self._bucket, self._key, _ = fs.split_path(path)
        self._upload_id: str | None = None

    async def put_whole(self, data: memoryview) -> None:
        await self._fs._call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=ViewFile(data))

    async def start(self) -> None:
        created = await self._fs._call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)
        self._upload_id = created["UploadId"]

    async def put_part(self, number: int, data: memoryview) -> Any:
        stored = await self._fs._call_s3(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=ViewFile(data)
        )
        return {"PartNumber": number, "ETag": stored["ETag"]}

    async def complete(self, tokens: list[Any]) -> None:
        await self._fs._call_s3(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": tokens},
        )

    async def abort(self) -> None:
        if self._upload_id is not None:
            await self._fs._call_s3(
                "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            )


class GCSComposeSink(PartSink):
    """One object uploaded as temporary part objects composed into it (gcsfs's client)."""

    #: 8 parts of 8 MiB, 8 of 16, then 32 MiB: 256 MiB in 18 parts, 683 MiB in 32 (one compose).
    ramp_parts = 8

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        folder, _, name = path.rpartition("/")
        self._temp_stem = f"{folder}/{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
        self._temporaries: set[str] = set()

    async def put_whole(self, data: memoryview) -> None:
        await self._upload(self._path, data)

    async def start(self) -> None:
        return None

    async def put_part(self, number: int, data: memoryview) -> Any:
        part = f"{self._temp_stem}-{number:05d}{PART_SUFFIX}"
        self._temporaries.add(part)
        await self._upload(part, data)
        return part

    async def complete(self, tokens: list[Any]) -> None:
        sources = [str(t) for t in tokens]
        level = 0
        while len(sources) > _COMPOSE_FANIN:
            groups = [sources[i : i + _COMPOSE_FANIN] for i in range(0, len(sources), _COMPOSE_FANIN)]
            targets = [f"{self._temp_stem}-c{level}-{i:04d}{PART_SUFFIX}" for i in range(len(groups))]
            self._temporaries.update(targets)
            await asyncio.gather(*(self._fs._merge(t, g) for t, g in zip(targets, groups, strict=True)))
            sources, level = targets, level + 1
        await self._fs._merge(self._path, sources)
        try:
            await self._delete_temporaries()
        except Exception as exc:  # noqa: BLE001 - the object is published; only clean-up failed
            logger.warning(
                "published %s, but could not delete its temporary part objects %s* (%s: %s); "
                "listings skip them, and deleting the folder removes them",
                self._path,
                self._temp_stem,
                type(exc).__name__,
                exc,
            )

    async def abort(self) -> None:
        await self._delete_temporaries()

    async def _upload(self, path: str, data: memoryview) -> None:
        """One media upload (the body is the bytes alone, streamed; gcsfs's own simple
        upload concatenates a multipart body, a copy of every part)."""
        bucket, key, _ = self._fs.split_path(path)
        await self._fs._call(
            "POST",
            f"{self._fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="media",
            name=key,
            data=ViewFile(data),
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
        self._fs.invalidate_cache(path)

    async def _delete_temporaries(self) -> None:
        if self._temporaries:
            try:
                await self._fs._rm(sorted(self._temporaries))
            except FileNotFoundError:
                pass
            self._temporaries.clear()


def default_part_size(protocol: str) -> int:
    """The part size streaming uploads to ``protocol`` use unless told otherwise."""
    return _PART_SIZES.get(protocol, _DEFAULT_PART_SIZE)


def part_sink_for(protocol: str, fs: Any, path: str) -> PartSink | None:
    """The parallel-upload sink for ``protocol``, or None where the backend has none."""
    if protocol in ("s3", "s3a"):
        return S3MultipartSink(fs, path)
    if protocol in ("gs", "gcs"):
        return GCSComposeSink(fs, path)
    return None
