"""`app.heap`: what a process built while booting leaves the collector's generations."""

from __future__ import annotations

import gc


def test_freezing_after_boot_moves_the_boot_objects_out_of_the_collectors_view() -> None:
    gc.unfreeze()
    booted = [{"kept": index} for index in range(1000)]
    from app.heap import freeze_after_boot

    try:
        freeze_after_boot()
        assert gc.get_freeze_count() >= len(booted)
        assert all(not any(obj is item for obj in gc.get_objects(generation=2)) for item in booted[:3])
    finally:
        gc.unfreeze()
