"""Helpers for the Hugging Face Trainer integration tests: a tiny GPT-2 run, fake checkpoints, spies."""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ckptio.storage import Storage, StorageWrapper, StreamWriter

MAX_STEPS = 12
SAVE_STEPS = 4


class TinyTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """48 fixed random sequences of 16 tokens: one epoch of 12 steps at batch size 4."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(TrainerCallback):
    """Records the loss logged at each step; stops training after ``stop_at`` steps (an interruption)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_total_limit=1,
        seed=0,
        dataloader_num_workers=0,
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    return TrainingArguments(str(output_dir), **(options | overrides))


def train(
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    stop_at: int | None = None,
    resume: str | None = None,
) -> tuple[dict[int, float], Trainer]:
    """Train the tiny GPT-2 (same seeds every time); return the logged losses by step and the trainer."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    log = LossLog(stop_at)
    trainer = Trainer(
        model=model, args=training_args(output_dir), train_dataset=TinyTokens(), callbacks=[log, *callbacks]
    )
    trainer.train(resume_from_checkpoint=resume)
    return log.losses, trainer


def fake_checkpoint(output_dir: Path, step: int) -> dict[str, bytes]:
    """Write ``output_dir/checkpoint-<step>`` as the Trainer would (arbitrary bytes); return its files."""
    files = {
        "model.safetensors": os.urandom(3000),
        "optimizer.pt": os.urandom(2000),
        "scheduler.pt": os.urandom(100),
        "rng_state.pth": os.urandom(200),
        "trainer_state.json": f'{{"global_step": {step}}}'.encode(),
        "global_step/zero_pp_rank_0_states.pt": os.urandom(50),
    }
    for name, data in files.items():
        path = output_dir / f"checkpoint-{step}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_tree(root: str | Path) -> dict[str, bytes]:
    """Every file below ``root``, keyed by its POSIX path relative to it."""
    out: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


class GatedStorage(StorageWrapper):
    """Every write waits for ``gate`` (at most ``timeout`` seconds, once) and records its thread."""

    def __init__(self, inner: Storage, gate: threading.Event | None = None, threads: list[str] | None = None,
                 timeout: float = 5.0) -> None:
        super().__init__(inner)
        self.gate = gate if gate is not None else threading.Event()
        self.threads: builtins.list[str] = threads if threads is not None else []
        self.timeout = timeout

    def rewrap(self, inner: Storage) -> GatedStorage:
        return GatedStorage(inner, self.gate, self.threads, self.timeout)

    def _enter(self) -> None:
        self.threads.append(threading.current_thread().name)
        if not self.gate.wait(self.timeout):
            self.gate.set()  # waited once in vain (a synchronous upload): do not stall every write

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._enter()
        super().write_bytes(key, data)

    def open_writer(self, key: str) -> StreamWriter:
        self._enter()
        return super().open_writer(key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self._enter()
        super().create_exclusive(key, data)
