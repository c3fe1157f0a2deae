"""Child processes of the job (readers, engine instances) that exit on their own when the job is killed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def exit_with_parent(parent: int, cleanup: Callable[[], None] | None = None) -> None:
    """Watch, in a daemon thread, for this process's parent to change from ``parent``; then run ``cleanup`` and exit.

    A job killed with SIGKILL cannot stop its children. ``parent`` is the job's pid as the job saw it, passed in
    (not ``os.getppid()`` read here: a child still starting when the job died would take its new parent, init, for
    the job and never exit).
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        if cleanup is not None:
            cleanup()
        os._exit(1)

    threading.Thread(target=watch, name="mtgr-exit-with-parent", daemon=True).start()
