"""torch.distributed.checkpoint (DCP) over any ckptio storage, committed like every ckptio checkpoint.

::

    import torch.distributed.checkpoint as dcp
    import ckptio.dcp

    dcp.save(state_dict, storage_writer=ckptio.dcp.StorageWriter("s3://bucket/run/step-100", storage_options=opts))
    dcp.load(state_dict, storage_reader=ckptio.dcp.StorageReader("s3://bucket/run/step-100", storage_options=opts))

Layout of a checkpoint saved by two ranks::

    step-100/
        checkpoint_in_progress.json       coordinator, before any rank writes; removed after the commit
        rank00000-part000.distcp, ...     rank 0's items, raw bytes, split by size over a few files
        rank00001-part000.distcp, ...     rank 1's items
        dcp_metadata.pkl                  DCP's Metadata (every item's file, offset and length)
        checkpoint_manifest.json          last: every file above with size and CRC32C (the commit)

Every rank streams its files at once (each published whole, or not at all,
by the storage layer); the records of those files (size, CRC32C) reach the
coordinator inside DCP's own write results, so ``finish`` knows every file
without another collective. It writes DCP's metadata, then *creates* the
manifest, the single atomic commit point: before it the directory is
incomplete (the marker says so), after it the directory is a complete ckptio
checkpoint that :func:`ckptio.checkpoint.validate_checkpoint` and
:func:`~ckptio.checkpoint.verify_checkpoint` accept. There is no rename
(DCP's own file writer renames its metadata into place): S3 and GCS have no
atomic rename, and an object that appears whole needs none.

The reader loads only committed checkpoints, checks every file's size
against the manifest with one listing before reading, and fetches only the
byte span each item needs, so resharding (saved on N ranks, loaded on M)
reads each byte at most about once overall. Errors are :mod:`ckptio.errors`
exceptions naming the URL; DCP wraps any exception raised inside its save or
load steps in a ``CheckpointException`` whose ``failures`` map each rank to it.

Data items, being DCP's non-tensor values, are pickles, and so is DCP's
metadata, as with DCP's own readers: load DCP checkpoints only from storage you trust.
"""

from __future__ import annotations

from ckptio.dcp.reader import StorageReader
from ckptio.dcp.writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter"]
