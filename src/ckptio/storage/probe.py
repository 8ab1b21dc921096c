"""The write probe: find out that a storage location cannot be written before anything depends on it.

A trainer that learns at its first save, hours in, that its credentials are
wrong or its bucket missing has lost those hours. :func:`probe_writable`
reads a uniquely named object that does not exist (a missing bucket answers
``NoSuchBucket`` there, a missing object ``NoSuchKey``; some S3-compatible
servers, SeaweedFS among them, would create a missing bucket on a write),
then creates and deletes it, so such a mistake fails at once, with the error
of the request that was refused.
"""

from __future__ import annotations

import uuid

from ckptio.errors import BucketNotFoundError, CkptioError, ObjectNotFoundError
from ckptio.storage.base import TEMP_PREFIX, Storage

__all__ = ["PROBE_PREFIX", "probe_writable"]

#: Name prefix of probe objects (a temporary name: listings skip one left by a killed process).
PROBE_PREFIX = f"{TEMP_PREFIX}write-probe-"


def probe_writable(storage: Storage) -> None:
    """Read (expecting no such object), create, then delete an empty object ``.ckptio-tmp-write-probe-<uuid>`` at the root of ``storage``.

    Three requests. Nothing else is touched.

    Raises:
        StoragePermissionError: the credentials may not write there (403, bad key).
        BucketNotFoundError: the bucket does not exist.
        CkptioError: any other failure of these requests, its message naming ``storage.url``.
    """
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        _expect_missing(storage, key)  # a missing bucket fails here, before a write could create it
        storage.write_bytes(key, b"")
        storage.delete(key)
    except CkptioError as exc:
        raise exc.with_message(
            f"{storage.url!r} is not writable: {exc} (write probe; nothing else was written; "
            "to only read from it, set CheckpointConfig(write_probe=False))"
        ) from exc


def _expect_missing(storage: Storage, key: str) -> None:
    """Read ``key``, which should not exist: a missing bucket (or refused access) raises."""
    try:
        storage.read_bytes(key)
    except BucketNotFoundError:
        raise
    except ObjectNotFoundError:
        return
