"""What a trainer hands the checkpoint manager: state components and who owns them.

A *component* is anything with ``state_dict()`` / ``load_state_dict()``
(:class:`Stateful`): modules, optimizers, LR schedulers, torchdata's
``StatefulDataLoader``, :class:`~ckptio.state.progress.TrainingProgress`,
:class:`~ckptio.state.rng.RNGState` all fit without wrappers. A
:class:`StateComponent` names one, says how it is shared across ranks
(:class:`SharingPattern`) and whether the checkpoint is unusable without it.

A trainer exposes its components through a :class:`StatefulProvider`; the
process groups it names (for ``PER_GROUP``) come from
``get_process_groups()``, which may be omitted: :func:`process_groups_of`
then returns ``{}``, and :class:`StatefulProviderBase` supplies that default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ckptio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "StatefulProvider",
    "StatefulProviderBase",
    "ValidationLevel",
    "process_groups_of",
    "validate_name_fragment",
]

#: Keys and group names become parts of file names: letters, digits, ``.``, ``_``, ``-``.
_NAME_FRAGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state can be captured and restored.

    ``torch.nn.Module``, ``torch.optim.Optimizer``, LR schedulers and torchdata's
    ``StatefulDataLoader`` satisfy it as they are. ``state_dict()`` must return
    only what ``torch.load(weights_only=True)`` accepts (tensors, numbers,
    strings, bytes, ``None``, and dicts/lists/tuples/sets of those).
    """

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


class _ValueEnum(str, Enum):
    """A string enum that prints as its value (also in f-strings on every Python version)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class SharingPattern(_ValueEnum):
    """How a component's state is distributed over the ranks of a job.

    * ``GLOBAL``: one state for the job; global rank 0 writes it, every rank reads it.
    * ``PER_RANK``: each rank has its own (RNG, data-loader position); each
      rank writes and reads back its own file.
    * ``REPLICATED``: identical on every rank (DDP optimizer state); rank 0
      writes it once, every rank reads it; optionally verified at save.
    * ``PER_GROUP``: one state per process group (e.g. per tensor-parallel
      group); the group's lowest global rank writes it, every member reads it.
    * ``PER_NODE``: one state per machine; local rank 0 of each node writes
      it, every rank on that node reads it.
    """

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"


class ValidationLevel(_ValueEnum):
    """How thoroughly replicated state is compared across ranks at save.

    * ``NONE``: not compared.
    * ``QUICK``: structure, dtypes, shapes, every non-tensor value, and a
      strided sample of at most a few thousand elements of each tensor.
    * ``TENSOR``: additionally a CRC32C of every element of every tensor.
    * ``FULL``: a 128-bit BLAKE2b digest of every element of every tensor
      (slower; collisions are practically impossible).
    """

    NONE = "none"
    QUICK = "quick"
    TENSOR = "tensor"
    FULL = "full"


def validate_name_fragment(value: object, what: str) -> str:
    """Return ``value`` if it can be part of a file name, else raise.

    Raises:
        InvalidArgumentError: not a non-empty string of letters, digits, ``.``,
            ``_`` and ``-`` (not starting with ``.`` or ``-``).
    """
    if not isinstance(value, str) or not _NAME_FRAGMENT.fullmatch(value):
        raise InvalidArgumentError(
            f"{what} must be a non-empty file-name fragment of letters, digits, '.', '_' and '-' "
            f"(no '/', not starting with '.' or '-'), got {value!r}"
        )
    return value


def _coerce_enum(enum_type: type[Enum], value: object, what: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise InvalidArgumentError(f"{what} must be one of {choices}, got {value!r}") from None


@dataclass
class StateComponent:
    """One piece of training state, how it is shared, and whether it is required.

    Attributes:
        key: name of the component; part of its file names
            (``{key}_state.pt``, ``{key}_state_rank_{r}.pt``, ...).
        stateful: the object saved with ``state_dict()`` and restored with
            ``load_state_dict()``.
        sharing_pattern: a :class:`SharingPattern` (or its string value).
        process_group_name: the name, in the provider's ``get_process_groups()``,
            of the group this rank's copy belongs to; required for ``PER_GROUP``
            (ignored by the other patterns).
        required: a missing or unreadable required component fails the load;
            an optional one is a warning.
        validate_replication: compare the ranks' copies at save; only for
            ``REPLICATED``.
        validation_level: a :class:`ValidationLevel` (or its string value),
            used with ``validate_replication``; stored as the enum, which
            compares equal to its string value.
        metadata: JSON-serializable facts copied into the manifest entry.

    Raises:
        InvalidArgumentError: (a ``ValueError``) for any of the rules above.
    """

    key: str
    stateful: Stateful
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: str = "tensor"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name_fragment(self.key, "StateComponent.key")
        self.sharing_pattern = _coerce_enum(SharingPattern, self.sharing_pattern, f"sharing_pattern of {self.key!r}")
        self.validation_level = _coerce_enum(
            ValidationLevel, self.validation_level, f"validation_level of {self.key!r}"
        )
        if not isinstance(self.stateful, Stateful):
            raise InvalidArgumentError(
                f"component {self.key!r}: {type(self.stateful).__name__} has no state_dict()/load_state_dict()"
            )
        if self.sharing_pattern is SharingPattern.PER_GROUP:
            if self.process_group_name is None:
                raise InvalidArgumentError(
                    f"component {self.key!r} is PER_GROUP and needs process_group_name "
                    "(a key of the provider's get_process_groups())"
                )
        if self.process_group_name is not None:
            validate_name_fragment(self.process_group_name, f"process_group_name of {self.key!r}")
        if self.validate_replication and self.sharing_pattern is not SharingPattern.REPLICATED:
            raise InvalidArgumentError(
                f"component {self.key!r}: validate_replication needs SharingPattern.REPLICATED, "
                f"got {self.sharing_pattern.name}"
            )
        if not isinstance(self.metadata, dict):
            raise InvalidArgumentError(f"metadata of {self.key!r} must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"metadata of {self.key!r} must be JSON-serializable: {exc}") from exc


@runtime_checkable
class StatefulProvider(Protocol):
    """What a trainer exposes to the checkpoint manager.

    ``get_process_groups()`` maps the names used by ``PER_GROUP`` components
    to *this rank's* process group of that name (each rank returns the group
    it belongs to). It is optional: without it (or in a single process) the
    default is ``{}``; see :func:`process_groups_of` and :class:`StatefulProviderBase`.
    """

    def get_state_components(self) -> list[StateComponent]: ...

    def get_process_groups(self) -> dict[str, ProcessGroup]: ...


class StatefulProviderBase:
    """Convenience base class: subclasses implement ``get_state_components()`` only."""

    def get_state_components(self) -> list[StateComponent]:
        """Return this trainer's components; subclasses must override it."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_state_components()")

    def get_process_groups(self) -> dict[str, ProcessGroup]:
        """No named process groups (the default)."""
        return {}


def process_groups_of(provider: object) -> dict[str, ProcessGroup]:
    """Return ``provider.get_process_groups()``, or ``{}`` when it is absent or ``provider`` is None.

    Raises:
        InvalidArgumentError: the method returned something other than a dict.
    """
    method = getattr(provider, "get_process_groups", None)
    if method is None:
        return {}
    groups = method()
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise InvalidArgumentError(
            f"{type(provider).__name__}.get_process_groups() must return a dict, got {type(groups).__name__}"
        )
    return groups
