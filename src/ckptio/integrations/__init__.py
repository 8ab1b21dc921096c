"""Integrations with training frameworks; each module needs its framework (an optional extra).

* :mod:`ckptio.integrations.transformers`: a Hugging Face ``Trainer`` callback that commits every
  checkpoint to any storage, and :func:`~ckptio.integrations.transformers.fetch_latest_checkpoint`
  to resume from there (``pip install 'ckptio[transformers]'``).
* :mod:`ckptio.integrations.lightning`: a Lightning ``CheckpointIO`` plugin that saves, loads
  and removes checkpoints on any storage with ckptio's commit and checksums
  (``pip install 'ckptio[lightning]'``).

Importing this package imports no framework.
"""

from __future__ import annotations
