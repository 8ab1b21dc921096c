"""Demo: a small real training run that checkpoints, is killed, and resumes exactly.

    python -m ckptio.demo                          # checkpoints under ./runs/demo
    python -m ckptio.demo --async                  # asynchronous saves (CheckpointConfig.async_save)
    python -m ckptio.demo --output s3://bucket/run --storage-options '{"key": ...}'

The demo trains a tiny transformer on synthetic sequences three times:

1. uninterrupted, for reference;
2. in a child process that saves a checkpoint every ``--save-every`` steps and
   is killed with SIGKILL right after step ``--interrupt-at`` (no clean-up, as
   in a real crash);
3. in a fresh child process that resumes from the latest complete checkpoint
   and trains to the end.

It then checks that the resumed losses equal the reference losses bit for bit
and exits non-zero if they do not.

With ``--async`` the training processes save with ``async_save=True``:
``save_checkpoint()`` returns once the state is staged in host memory and the
checkpoint is written and committed on a background thread. The killed process
may then die with a save still being written, which leaves that checkpoint
incomplete, so the new process resumes from the latest *complete* checkpoint,
possibly the one before the last save; the demo says which checkpoint and step
it resumed from, and compares the losses of every step trained after it. When
no save had been committed before the kill (``--interrupt-at`` below twice
``--save-every``, or an unlucky race), the new process starts over from step 0.
A training process that ends normally closes its manager, which commits the
last save before the process exits.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptio.checkpoint import location_name
from ckptio.errors import CheckpointNotFoundError
from ckptio.manager import CheckpointConfig, CheckpointManager
from ckptio.state import RNGState, SharingPattern, StateComponent, TrainingProgress

__all__ = ["DemoTrainer", "main", "run_worker"]

VOCAB, SEQ, DIM = 64, 16, 32


class TinyTransformer(nn.Module):
    """One pre-norm transformer block over learned embeddings, predicting the next token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.block = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        hidden = self.block(self.embed(tokens) + self.pos[: tokens.shape[1]], src_mask=mask, is_causal=True)
        return self.head(hidden)  # type: ignore[no-any-return]


def synthetic_corpus(n: int = 512) -> torch.Tensor:
    """Sequences with learnable structure: each token follows from the previous one."""
    gen = torch.Generator().manual_seed(1234)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    steps = torch.randint(1, 4, (n, SEQ), generator=gen)
    return (start + steps.cumsum(dim=1)) % VOCAB


def make_loader(corpus: torch.Tensor) -> Any:
    """A shuffling, resumable data loader (torchdata's ``StatefulDataLoader``).

    Each epoch's order comes from ``(seed, epoch)`` through the sampler's
    ``set_epoch``, and the loader has a generator of its own: a loader that
    draws from the global torch RNG when it creates an iterator would shift
    dropout's random stream, since a resumed run creates its iterator at a
    different moment than an uninterrupted one.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = torch.utils.data.TensorDataset(corpus)
    sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=4321)
    return StatefulDataLoader(
        dataset, batch_size=16, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(0)
    )


@dataclass
class DemoTrainer:
    """Everything a training run holds, exposed as checkpoint components."""

    total_steps: int

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = TinyTransformer()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        self.loader = make_loader(synthetic_corpus())
        self.progress = TrainingProgress()
        self.rng = RNGState()
        self._batches: Iterator[Any] | None = None

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("dataloader", self.loader, SharingPattern.PER_RANK),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}

    def next_batch(self) -> torch.Tensor:
        while True:
            if self._batches is None:
                self.loader.sampler.set_epoch(self.progress.epoch)
                self._batches = iter(self.loader)
            try:
                (batch,) = next(self._batches)
                return batch  # type: ignore[no-any-return]
            except StopIteration:
                self._batches = None
                self.progress.epoch += 1

    def train_step(self) -> float:
        tokens = self.next_batch()
        logits = self.model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        self.progress.samples_seen += tokens.shape[0]
        return float(loss.item())


def run_worker(
    output: str,
    *,
    total_steps: int,
    save_every: int,
    resume: bool,
    interrupt_at: int | None = None,
    storage_options: dict[str, Any] | None = None,
    async_save: bool = False,
) -> dict[int, float]:
    """Train to ``total_steps`` (resuming first if asked), checkpointing every ``save_every`` steps.

    Prints ``RESUMED <step> <checkpoint>`` after resuming (with ``async_save``
    and no complete checkpoint: ``RESUMED 0 -``, and trains from the start),
    then one ``LOSS <step> <float.hex>`` line per step. With ``interrupt_at``
    the process kills itself with SIGKILL right after that step (and after
    that step's save, if any, has been started: with ``async_save`` it may
    still be in flight). A run that reaches ``total_steps`` closes the manager,
    which commits the last asynchronous save.
    """
    trainer = DemoTrainer(total_steps)
    config = CheckpointConfig(
        output_dir=output, save_total_limit=2, storage_options=storage_options, async_save=async_save
    )
    losses: dict[int, float] = {}
    with CheckpointManager(config, trainer, model=trainer.model) as manager:
        if resume:
            try:
                manager.load_checkpoint(None)
            except CheckpointNotFoundError:
                if not async_save:  # a synchronous save is committed before the kill: there must be one
                    raise
                print("RESUMED 0 -", flush=True)  # the only save(s) died in flight: start over
            else:
                manifest = manager.loaded_manifest
                name = location_name(manifest.checkpoint_path) if manifest is not None else "?"
                print(f"RESUMED {trainer.progress.step} {name}", flush=True)
        while trainer.progress.step < total_steps:
            loss = trainer.train_step()
            step = trainer.progress.step
            losses[step] = loss
            print(f"LOSS {step} {loss.hex()}", flush=True)
            if step % save_every == 0:
                manager.save_checkpoint()
            if interrupt_at is not None and step == interrupt_at:
                os.kill(os.getpid(), signal.SIGKILL)
    return losses


@dataclass
class _ChildRun:
    """What a training child reported: its exit code, losses per step, where it resumed, its stderr."""

    code: int
    losses: dict[int, float]
    resumed_step: int | None
    resumed_from: str | None
    stderr: str


def _run_child(args: list[str]) -> _ChildRun:
    proc = subprocess.run([sys.executable, "-m", "ckptio.demo", "--worker", *args], capture_output=True, text=True)
    losses: dict[int, float] = {}
    resumed_step: int | None = None
    resumed_from: str | None = None
    for line in proc.stdout.splitlines():
        if line.startswith("LOSS "):
            _, step, value = line.split()
            losses[int(step)] = float.fromhex(value)
        elif line.startswith("RESUMED "):
            _, step, resumed_from = line.split()
            resumed_step = int(step)
    return _ChildRun(proc.returncode, losses, resumed_step, resumed_from, proc.stderr)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ckptio.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join("runs", "demo"), help="local path or URL")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as JSON")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--interrupt-at", type=int, default=23)
    parser.add_argument(
        "--async",
        dest="async_save",
        action="store_true",
        help="save asynchronously (async_save=True): the killed process may die with a save still being "
        "written, and the resume comes from the latest complete checkpoint",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the three phases and report whether the resume was exact."""
    args = _parse(argv)
    options = json.loads(args.storage_options)
    # torchdata calls a hook that torch deprecated; the warning is noise in a demo's output.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    if args.worker:
        interrupt = None if args.resume else args.interrupt_at
        run_worker(args.output, total_steps=args.steps, save_every=args.save_every, resume=args.resume,
                   interrupt_at=interrupt, storage_options=options, async_save=args.async_save)
        return 0
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    output = f"{args.output.rstrip('/')}/run-{stamp}"
    common = ["--output", output, "--storage-options", args.storage_options, "--steps", str(args.steps),
              "--save-every", str(args.save_every), "--interrupt-at", str(args.interrupt_at)]
    if args.async_save:
        common.append("--async")
    print(f"1/3 reference run: {args.steps} steps without interruption")
    reference = {}
    trainer = DemoTrainer(args.steps)
    while trainer.progress.step < args.steps:
        loss = trainer.train_step()
        reference[trainer.progress.step] = loss
    saves = "asynchronous checkpoints" if args.async_save else "checkpoints"
    print(f"2/3 training with {saves} every {args.save_every} steps to {output}; "
          f"killing the process after step {args.interrupt_at}")
    interrupted = _run_child(common)
    if interrupted.code != -signal.SIGKILL:
        print(f"the interrupted run ended with {interrupted.code} instead of being killed:\n{interrupted.stderr}")
        return 1
    first = interrupted.losses
    last_save = max(first) // args.save_every * args.save_every
    if not args.async_save:
        print(f"    killed at step {max(first)} (SIGKILL); last checkpoint at step {last_save}")
    elif last_save:
        print(f"    killed at step {max(first)} (SIGKILL); last save started at step {last_save}, "
              "possibly still being written when the process died")
    else:
        print(f"    killed at step {max(first)} (SIGKILL); no save had been started")
    print("3/3 new process: resume from the latest complete checkpoint and train to the end")
    resumed = _run_child([*common, "--resume"])
    if resumed.code != 0:
        print(f"the resumed run failed:\n{resumed.stderr}")
        return 1
    second = resumed.losses
    if resumed.resumed_step is None:
        print(f"the resumed run did not say where it resumed:\n{resumed.stderr}")
        return 1
    resumed_from = resumed.resumed_step
    if not args.async_save:
        print(f"    resumed at step {resumed_from}")
    elif resumed.resumed_from == "-":
        print("    no checkpoint had been committed before the kill: started over from step 0")
    else:
        print(f"    resumed at step {resumed_from} from {resumed.resumed_from}")
        if resumed_from < last_save:
            print(f"    (the save started at step {last_save} had not been committed when the process was "
                  f"killed: the latest complete checkpoint is an earlier one)")
    print(f"{'step':>6} {'uninterrupted':>14} {'resumed':>14}")
    for step in sorted(second):
        print(f"{step:>6} {reference[step]:>14.6f} {second[step]:>14.6f}")
    exact = all(second[s] == reference[s] for s in second)
    verdict = "bit-identical" if exact else "DIFFERENT"
    print(f"resumed losses vs uninterrupted run: {verdict} over steps {resumed_from + 1}..{args.steps}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
