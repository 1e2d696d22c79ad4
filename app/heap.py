"""What a process keeps for its whole life leaves the garbage collector's view once it has booted.

A full (generation 2) collection walks every tracked object, and everything a web or worker process
builds while booting — modules, the Flask app and its pydantic models, SQLAlchemy's metadata and
compiled statements, the SDK's types — lives as long as the process. With it in the old generation
each full collection paused every thread of the process for 80 to 100 ms, which `make bench`'s steady
load showed as clusters of slow POSTs (the whole p99). `gc.freeze()` moves those objects to a
permanent generation the collector never walks; what turns allocate is collected as before.
"""

from __future__ import annotations

import gc


def freeze_after_boot() -> None:
    """Collect what booting left behind, then freeze the rest; call once, when the process is ready."""
    gc.collect()
    gc.freeze()
