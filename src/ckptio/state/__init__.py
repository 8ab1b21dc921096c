"""Training state beyond the model weights: components, sharing across ranks, RNG, progress.

* :mod:`~ckptio.state.components`: :class:`Stateful`, :class:`StateComponent`,
  :class:`SharingPattern`, :class:`ValidationLevel`, :class:`StatefulProvider`.
* :mod:`~ckptio.state.sharing`: which rank writes and reads which component file (pure).
* :mod:`~ckptio.state.distributed`: :class:`World`, rank facts and collectives;
  one process is a trivial world.
* :mod:`~ckptio.state.component_io`: one component file in, one out (``weights_only``).
* :mod:`~ckptio.state.replication`: check REPLICATED state is identical across ranks.
* :class:`RNGState` and :class:`TrainingProgress`: ready-made components.
"""

from __future__ import annotations

from ckptio.state.component_io import (
    load_component_state,
    save_component_state,
    unloadable_values,
)
from ckptio.state.components import (
    SharingPattern,
    StateComponent,
    Stateful,
    StatefulProvider,
    StatefulProviderBase,
    ValidationLevel,
    process_groups_of,
)
from ckptio.state.distributed import NodeTopology, World, node_topology
from ckptio.state.progress import TrainingProgress
from ckptio.state.replication import (
    ReplicationMismatchError,
    check_replicated,
    state_digests,
)
from ckptio.state.rng import RNGState, RNGStateWarning
from ckptio.state.sharing import (
    WORLD_SIZE_POLICIES,
    ComponentPlacement,
    RankFacts,
    RankInfo,
    component_file_name,
    file_for_load,
    placement_for_save,
)

__all__ = [
    "WORLD_SIZE_POLICIES",
    "ComponentPlacement",
    "NodeTopology",
    "RNGState",
    "RNGStateWarning",
    "RankFacts",
    "RankInfo",
    "ReplicationMismatchError",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "StatefulProvider",
    "StatefulProviderBase",
    "TrainingProgress",
    "ValidationLevel",
    "World",
    "check_replicated",
    "component_file_name",
    "file_for_load",
    "load_component_state",
    "node_topology",
    "placement_for_save",
    "process_groups_of",
    "save_component_state",
    "state_digests",
    "unloadable_values",
]
