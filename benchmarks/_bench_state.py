"""The benchmark's training state and memory probes (used by ``bench_dataplane.py``).

The state is a decoder-only transformer in fp32 (token embedding, per layer:
two LayerNorms, q/k/v/o ``d x d`` and MLP ``d x 4d`` / ``4d x d`` matrices,
a final LayerNorm) plus AdamW after one step, so ``exp_avg`` and
``exp_avg_sq`` exist. The model is a third of the requested size and the two
moments the other two thirds (1 GiB = ~341 MiB weights + 2 x ~341 MiB moments).
About 60 % of the weights are layers; the embedding's vocabulary absorbs the rest,
so the total lands within a few MiB of the request.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from torch import nn

MiB = 2**20


@dataclass(frozen=True)
class Shape:
    """Transformer dimensions chosen for a byte budget."""

    d_model: int
    layers: int
    vocab: int

    @property
    def model_bytes(self) -> int:
        """fp32 bytes of the weights."""
        d = self.d_model
        per_layer = (
            12 * d * d + 4 * d + 4 * d
        )  # matrices, two LayerNorms (weight + bias)
        return 4 * (self.vocab * d + self.layers * per_layer + 2 * d)

    def describe(self) -> str:
        """One line: dimensions and sizes."""
        model = self.model_bytes / MiB
        return (
            f"transformer d_model={self.d_model} layers={self.layers} vocab={self.vocab} fp32: "
            f"model {model:.0f} MiB + AdamW exp_avg/exp_avg_sq {2 * model:.0f} MiB = {3 * model:.0f} MiB"
        )


def shape_for(size_mib: int) -> Shape:
    """Dimensions whose model plus two AdamW moments take about ``size_mib`` MiB."""
    model_bytes = size_mib * MiB / 3
    d = 1024 if size_mib >= 256 else 256
    per_layer = 4 * (12 * d * d + 8 * d)
    layers = max(1, int(0.6 * model_bytes // per_layer))
    vocab = max(16, int((model_bytes - layers * per_layer) // (4 * d)))
    return Shape(d, layers, vocab)


class Block(nn.Module):
    """Attention and MLP weights of one layer (never run forward)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, 4 * d, bias=False)
        self.down_proj = nn.Linear(4 * d, d, bias=False)


class Transformer(nn.Module):
    """Embedding, blocks and a final norm: only the parameter shapes matter here."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab, shape.d_model)
        self.layers = nn.ModuleList(Block(shape.d_model) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(shape.d_model)


def build_state(
    size_mib: int, seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model with random weights and an AdamW that has taken one step.

    The gradient of each parameter is the parameter itself (no extra memory, no
    backward pass) and the per-tensor AdamW path is used, so building the state
    never needs much more memory than the state itself.
    """
    with torch.device("meta"):
        model = Transformer(shape_for(size_mib))
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=gen)
            param.grad = param.detach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    optimizer.step()
    for param in model.parameters():
        param.grad = None
    return model, optimizer


def load_state(size_mib: int, path: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The state :func:`build_state` made, read back from :func:`write_state`'s file (fast)."""
    with torch.device("meta"):
        model = Transformer(shape_for(size_mib))
    model.to_empty(device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for param in model.parameters():
        moments = {k: torch.empty_like(param) for k in ("exp_avg", "exp_avg_sq")}
        optimizer.state[param] = {"step": torch.tensor(0.0), **moments}
    with open(path, "rb") as src:
        for view in byte_views(flat_state(model, optimizer)):
            if src.readinto(view) != view.nbytes:
                raise EOFError(f"{path} is shorter than a {size_mib} MiB state")
    return model, optimizer


def write_state(size_mib: int, path: str) -> None:
    """Build the state once and keep its bytes in ``path`` for :func:`load_state`."""
    model, optimizer = build_state(size_mib)
    with open(path, "wb") as out:
        for view in byte_views(flat_state(model, optimizer)):
            out.write(view)


def flat_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Every tensor of the state under a unique flat name (for safetensors-style files)."""
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                flat[f"optimizer.{names[id(param)]}.{key}"] = value
    return flat


def apply_flat(
    model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]
) -> None:
    """Copy a :func:`flat_state` mapping back into the live tensors."""
    with torch.no_grad():
        for name, tensor in flat_state(model, optimizer).items():
            tensor.copy_(flat[name])


def touch(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Read one byte of every page of the state, so lazily mapped loads pay like a training step would.

    Uses numpy (single-threaded), so the probe costs the same for every case.
    """
    return sum(
        int(view.numpy()[::4096].sum()) for view in _uint8(flat_state(model, optimizer))
    )


def _uint8(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [
        t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()
    ]


def byte_views(tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The raw bytes of each tensor, without copying."""
    return [memoryview(t.numpy()) for t in _uint8(tensors)]


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def current_rss() -> int:
    """Resident bytes now."""
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        return 0


def peak_rss() -> int:
    """Peak resident bytes since the last :func:`reset_peak` (else since the process began)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
