"""What a trainer needs from a checkpointer, and where and how checkpoints are written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptio.errors import InvalidArgumentError
from ckptio.storage.progress import ProgressCallback
from ckptio.storage.retry import RetryPolicy

__all__ = ["CheckpointConfig", "CheckpointInterface"]


class CheckpointInterface(Protocol):
    """What a trainer needs from a checkpointer."""

    def save_checkpoint(self, checkpoint_path: str | None = None, checkpoint_id: int | str | None = None) -> str: ...

    def load_checkpoint(self, checkpoint_path: str | None = None) -> None: ...

    def save_model(self, output_dir: str | None = None, overwrite_output_dir: bool = False) -> None: ...

    def set_best_checkpoint(self, best_checkpoint: str) -> None: ...

    def resolve_checkpoint_path(self, checkpoint_path: str | None) -> str | None: ...


@dataclass
class CheckpointConfig:
    """Where and how checkpoints are written.

    Attributes:
        output_dir: local path or URL; checkpoints go to ``<output_dir>/checkpoints/``.
        save_total_limit: keep the newest N complete checkpoints (None: keep all).
        save_safetensors: model weights as safetensors (else PyTorch ``.bin``).
        max_shard_size: largest weights shard in bytes.
        preserve_n_best: how many best checkpoints rotation never deletes.
        storage_options: fsspec options for the backend (credentials, endpoint).
        verify_checksums_on_load: recompute every file's CRC32C before loading.
        on_world_size_change: what PER_RANK/PER_NODE state saved at another world
            size does on load: ``"error"`` (default), ``"rank0"`` (every rank
            loads rank 0's copy) or ``"skip"`` (leave it as initialised).
        load_broadcast: on a resume with several ranks, only the first rank of
            each node reads the model weights from storage and broadcasts them
            to the other ranks of its node over a per-node process group
            (``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` decide the nodes, else host
            names). Fewer requests and bytes from the bucket (one download per
            node instead of one per rank), for one extra copy of the model over
            the node's interconnect and the wait for it. The model must live on
            a device the process group can send (gloo: CPU; NCCL: CUDA).
            Default False: every rank reads its own copy.
        async_save: ``save_checkpoint()`` returns as soon as the state is
            copied off the training path (staged: CUDA tensors into pinned host
            buffers, CPU tensors into host buffers, both reused from save to
            save); the files and the manifest are written on a background
            thread. One save is in flight at a time; its error is raised by the
            next save, load, ``save_model``, ``wait_until_finished`` or
            ``close``. Needs host memory for one copy of the state's tensors
            (held until ``close()``), plus 192 MiB of upload buffers on object
            stores and a 256 MiB margin; a save that would not fit raises
            :class:`~ckptio.errors.InsufficientMemoryError` before writing.
        async_timeout_s: how long a background save waits for the other ranks
            at each exchange (a rank that died or hangs) before it fails;
            its error is raised by the next call, as any background error.
        retry: how transient storage failures (timeouts, 5xx, throttling,
            injected transient faults) are retried, on every operation of a
            save or a load (None: the storage's own policy, else the default).
        write_probe: on an object store (S3, GCS, any remote fsspec backend), rank 0
            reads (expecting nothing), creates and deletes one empty object ``.ckptio-tmp-write-probe-<uuid>``
            in ``output_dir`` when the manager is constructed (three requests, once),
            so wrong credentials or a missing bucket fail before training starts,
            on every rank. Set False to load from a location you cannot write.
            Local disk and ``memory://`` are not probed.
        progress: report the bytes each save writes and each load reads: a
            callable gets a :class:`~ckptio.storage.ProgressEvent` at every step; True
            shows a tqdm bar on global rank 0 when tqdm is installed and stderr
            is a terminal. Default False: nothing.

    A request that gets no answer fails after the storage option ``stall_timeout_s``
    (default 120 s; see :mod:`ckptio.storage.stall`) instead of hanging the save.
    """

    output_dir: str
    save_total_limit: int | None = None
    save_safetensors: bool = True
    max_shard_size: int = 2**31
    preserve_n_best: int = 1
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials: never printed
    verify_checksums_on_load: bool = False
    on_world_size_change: str = "error"
    load_broadcast: bool = False
    retry: RetryPolicy | None = None
    async_save: bool = False
    async_timeout_s: float = 1800.0
    write_probe: bool = True
    progress: bool | ProgressCallback = False

    def __post_init__(self) -> None:
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise InvalidArgumentError(
                f"save_total_limit must be None or at least 1, got {self.save_total_limit}; "
                "a limit below 1 would delete every checkpoint"
            )
        if self.preserve_n_best < 0:
            raise InvalidArgumentError(f"preserve_n_best must be >= 0, got {self.preserve_n_best}")
        if self.max_shard_size < 1:
            raise InvalidArgumentError(f"max_shard_size must be positive, got {self.max_shard_size}")
        if self.async_timeout_s <= 0:
            raise InvalidArgumentError(f"async_timeout_s must be positive, got {self.async_timeout_s}")
        if self.on_world_size_change not in ("error", "rank0", "skip"):
            raise InvalidArgumentError(
                f"on_world_size_change must be 'error', 'rank0' or 'skip', got {self.on_world_size_change!r}"
            )
