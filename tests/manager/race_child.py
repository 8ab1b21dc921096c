"""Child process for the save race: saves one checkpoint name at an agreed moment.

``race_child.py URL OPTIONS_JSON VALUE START_AT``: every parameter and the
progress step hold ``VALUE``; at ``START_AT`` (a ``time.time()``) the child saves
``checkpoint-7`` with every write slowed down a little, so that two children's
saves overlap. Prints ``SAVED`` or ``REFUSED <error class>: <message>``.
"""

from __future__ import annotations

import json
import sys
import time

from crash_child import _set_all, build

from ckptio.errors import CkptioError

CHECKPOINT_ID = 7


def main() -> None:
    url, options, value, start_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    manager, model, provider = build(url, options, write_delay=0.05)
    _set_all(model, provider, value)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        manager.save_checkpoint(checkpoint_id=CHECKPOINT_ID)
    except CkptioError as exc:
        print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
    else:
        print("SAVED", flush=True)


if __name__ == "__main__":
    main()
