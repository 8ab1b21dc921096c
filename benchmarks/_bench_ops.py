"""What each benchmark case does to save and load the state (used by ``bench_dataplane.py``).

Every case saves the same model and AdamW state and loads it back into live
tensors, the way a trainer resumes. Baselines run at their defaults; ``raw-*``
cases move the bare tensor bytes with no format at all (the hardware or
object-store limit). ``target`` is a local directory or an fsspec URL.
"""

from __future__ import annotations

import asyncio
import glob
import os
from collections.abc import Callable
from typing import Any

import torch
from _bench_state import apply_flat, byte_views, flat_state
from torch import nn

Op = Callable[[str, dict[str, Any], nn.Module, torch.optim.Optimizer], None]
MiB = 2**20
#: Concurrent requests of the raw object-store baseline.
RAW_INFLIGHT = 8

# --------------------------------------------------------------------------- ckptio


def _manager(
    target: str,
    options: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Any:
    import ckptio

    class Provider:
        def get_state_components(self) -> list[ckptio.StateComponent]:
            return [
                ckptio.StateComponent(
                    "optimizer", optimizer, ckptio.SharingPattern.REPLICATED
                )
            ]

        def get_process_groups(self) -> dict[str, Any]:
            return {}

    config = ckptio.CheckpointConfig(output_dir=target, storage_options=options or None)
    return ckptio.CheckpointManager(config, Provider(), model=model)


def save_manager(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    _manager(target, options, model, opt).save_checkpoint()


def load_manager(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    _manager(target, options, model, opt).load_checkpoint(None)


def save_weights(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import ckptio

    ckptio.save_checkpoint(
        target, model, safetensors=True, storage_options=options or None
    )


def load_weights(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import ckptio

    ckptio.load_checkpoint(target, model, storage_options=options or None)


# --------------------------------------------------------------------------- local peers


def save_raw_fsync(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "state.raw"), "wb") as out:
        for view in byte_views(flat_state(model, opt)):
            out.write(view)
        out.flush()
        os.fsync(out.fileno())


def load_raw_fsync(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    with open(os.path.join(target, "state.raw"), "rb") as src:
        for view in byte_views(flat_state(model, opt)):
            src.readinto(view)


def save_torch(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    os.makedirs(target, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()},
        os.path.join(target, "state.pt"),
    )


def load_torch(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    state = torch.load(
        os.path.join(target, "state.pt"), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def save_safetensors(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import safetensors.torch

    os.makedirs(target, exist_ok=True)
    safetensors.torch.save_file(
        flat_state(model, opt), os.path.join(target, "state.safetensors")
    )


def load_safetensors(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import safetensors.torch

    apply_flat(
        model,
        opt,
        safetensors.torch.load_file(os.path.join(target, "state.safetensors")),
    )


def save_hf(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import huggingface_hub

    os.makedirs(target, exist_ok=True)
    huggingface_hub.save_torch_state_dict(flat_state(model, opt), target)


def load_hf(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import huggingface_hub

    flat: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(target, "*.safetensors"))):
        flat.update(huggingface_hub.load_state_dict_from_file(path))
    apply_flat(model, opt, flat)


def crc32c(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    """Not a save: CRC32C of every tensor's bytes, with the checksum ckptio uses."""
    from ckptio.storage.integrity import checksum_bytes

    for view in byte_views(flat_state(model, opt)):
        checksum_bytes(view)


# --------------------------------------------------------------------------- torch DCP


def _dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optimizer": optim_state}


def _dcp_io(target: str, options: dict[str, Any], write: bool) -> Any:
    import torch.distributed.checkpoint as dcp

    if "://" not in target:
        return dcp.FileSystemWriter(target) if write else dcp.FileSystemReader(target)
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter  # type: ignore[attr-defined]
    except ImportError:  # torch versions that keep them private
        from torch.distributed.checkpoint._fsspec_filesystem import (
            FsspecReader,
            FsspecWriter,
        )
    return FsspecWriter(target, **options) if write else FsspecReader(target, **options)


def save_dcp(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(
        _dcp_state(model, opt),
        storage_writer=_dcp_io(target, options, True),
        no_dist=True,
    )


def load_dcp(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, opt)
    dcp.load(state, storage_reader=_dcp_io(target, options, False), no_dist=True)
    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


# --------------------------------------------------------------------------- raw object store


def _parts(views: list[memoryview], total_parts: int) -> list[list[memoryview]]:
    """Split the concatenated bytes of ``views`` into ``total_parts`` runs of slices."""
    size = sum(v.nbytes for v in views)
    part_size = -(-size // total_parts)
    parts: list[list[memoryview]] = [[]]
    room = part_size
    for view in views:
        while view.nbytes:
            if room == 0:
                parts.append([])
                room = part_size
            piece, view = view[:room], view[room:]
            parts[-1].append(piece)
            room -= piece.nbytes
    return parts


def raw_part_count(total: int) -> int:
    """Parts of the raw baseline: 64 MiB each, and at least two per request in flight."""
    return max(2 * RAW_INFLIGHT, -(-total // (64 * MiB)))


def _filesystem(target: str, options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(target, **options)  # type: ignore[no-any-return]


async def _bounded(coros: list[Any]) -> None:
    gate = asyncio.Semaphore(RAW_INFLIGHT)

    async def run(coro: Any) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(run(c) for c in coros))


def save_raw_objects(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    from fsspec.asyn import sync

    fs, root = _filesystem(target, options)
    views = byte_views(flat_state(model, opt))
    parts = _parts(views, raw_part_count(sum(v.nbytes for v in views)))

    async def put(index: int, part: list[memoryview]) -> None:
        await fs._pipe_file(f"{root}/part-{index:05d}", b"".join(part))

    sync(fs.loop, _bounded, [put(i, p) for i, p in enumerate(parts)])


def load_raw_objects(
    target: str, options: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer
) -> None:
    from fsspec.asyn import sync

    fs, root = _filesystem(target, options)
    views = byte_views(flat_state(model, opt))
    parts = _parts(views, raw_part_count(sum(v.nbytes for v in views)))

    async def get(index: int, part: list[memoryview]) -> None:
        data = memoryview(await fs._cat_file(f"{root}/part-{index:05d}"))
        for piece in part:
            piece[:] = data[: piece.nbytes]
            data = data[piece.nbytes :]

    sync(fs.loop, _bounded, [get(i, p) for i, p in enumerate(parts)])


#: case name -> (save, load or None, where it runs: "local", "remote" or "both", what it is)
CASES: dict[str, tuple[Op, Op | None, str, str]] = {
    "ckptio": (save_manager, load_manager, "both", "CheckpointManager, model + AdamW"),
    "ckptio-weights": (
        save_weights,
        load_weights,
        "both",
        "save_checkpoint/load_checkpoint, weights only",
    ),
    "raw-fsync": (
        save_raw_fsync,
        load_raw_fsync,
        "local",
        "write + fsync / readinto of the tensor bytes",
    ),
    "torch": (save_torch, load_torch, "local", "torch.save / torch.load"),
    "safetensors": (
        save_safetensors,
        load_safetensors,
        "local",
        "save_file / load_file",
    ),
    "hf": (
        save_hf,
        load_hf,
        "local",
        "huggingface_hub save_torch_state_dict / load_state_dict_from_file",
    ),
    "dcp": (
        save_dcp,
        load_dcp,
        "both",
        "torch DCP, FileSystem- or FsspecWriter/Reader, defaults, no_dist",
    ),
    "raw-objects": (
        save_raw_objects,
        load_raw_objects,
        "remote",
        f"fs pipe/cat, >=16 parts of <=64 MiB, {RAW_INFLIGHT} in flight",
    ),
    "crc32c": (crc32c, None, "local", "checksum_bytes over the same bytes"),
}
