"""The checkpoint manager: saves and restores all trainer state across ranks.

* :mod:`~ckptio.manager.config`: :class:`CheckpointConfig` and :class:`CheckpointInterface`.
* :mod:`~ckptio.manager.checkpoint_manager`: :class:`CheckpointManager`, the save and load
  protocol across ranks.
* :mod:`~ckptio.manager.components`: each rank's share of the state components.
* :mod:`~ckptio.manager.model_dir`: the final Hugging Face-style model directory.
"""

from __future__ import annotations

from ckptio.manager.checkpoint_manager import CheckpointManager
from ckptio.manager.components import MissingComponentWarning
from ckptio.manager.config import CheckpointConfig, CheckpointInterface

__all__ = ["CheckpointConfig", "CheckpointInterface", "CheckpointManager", "MissingComponentWarning"]
