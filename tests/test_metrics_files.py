"""Folding the counter files of ended processes (`app.metrics_files`), on files real processes wrote through
prometheus_client's multiprocess mode. The serving commands' own folds (at `agentq web`'s start, at a worker
group's restart) are checked end to end in tests/test_recovery.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env
from tests.support import ROOT, wait_for

COUNTING = ("from app import metrics; metrics.observe_terminal('success'); metrics.observe_terminal('success'); "
            "metrics.observe_cost('turn', __import__('decimal').Decimal('0.25')); "
            "metrics.LLM_LATENCY.labels('m').observe(0.3); metrics.LLM_LATENCY.labels('m').observe(7)")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _count_in(directory: Path, *, stay: bool = False) -> subprocess.Popen[bytes]:
    """A process that counts into `directory`, and ends at once or, with `stay`, once its stdin closes."""
    script = COUNTING + ("; import sys; sys.stdin.read()" if stay else "")
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                            env=child_env(PROMETHEUS_MULTIPROC_DIR=str(directory)))


def _samples(directory: Path) -> Samples:
    """What a scrape of the directory answers, sample by sample."""
    from app.metrics_files import FoldSafeCollector

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in FoldSafeCollector(None, path=str(directory)).collect() for sample in family.samples}


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[Path, Samples]]:
    """Two processes that counted and ended, and what a scrape said of them."""
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    for _ in range(2):
        assert _count_in(directory).wait(timeout=60) == 0
    yield directory, _samples(directory)


def test_the_files_of_ended_processes_are_folded_into_one_a_kind_and_every_count_is_kept(
        counted: tuple[Path, Samples]) -> None:
    from app.metrics_files import fold_ended_processes

    directory, before = counted
    assert before[("agentq_turns_total", (("status", "success"),))] == 4.0
    assert before[("agentq_llm_latency_seconds_bucket", (("le", "0.5"), ("model", "m")))] == 2.0
    assert before[("agentq_llm_latency_seconds_bucket", (("le", "10.0"), ("model", "m")))] == 4.0
    living = _count_in(directory, stay=True)
    try:
        # Its last count is its second observation: a file exists from its first look at a series, before the
        # count is written in it.
        with_living = wait_for(lambda: (samples := _samples(directory)).get(
            ("agentq_llm_latency_seconds_count", (("model", "m"),))) == 6.0 and samples, timeout=60,
            what="the living process's counts")
        assert with_living[("agentq_turns_total", (("status", "success"),))] == 6.0

        assert fold_ended_processes(str(directory)) == 4  # two processes, a counter and a histogram file each
        assert _files(directory) == [".fold.lock", f"counter_{living.pid}.db", "counter_ended.db",
                                     f"histogram_{living.pid}.db", "histogram_ended.db"]
        assert _samples(directory) == with_living
    finally:
        living.stdin.close()  # type: ignore[union-attr]
        assert living.wait(timeout=60) == 0
    assert fold_ended_processes(str(directory)) == 2  # the one that was alive, into the same files
    assert _files(directory) == [".fold.lock", "counter_ended.db", "histogram_ended.db"]
    assert _samples(directory) == with_living
    assert fold_ended_processes(str(directory)) == 0


def test_a_fold_cut_short_after_its_file_replaced_the_last_is_finished_by_the_next(
        counted: tuple[Path, Samples], monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between writing the folded counts and removing what it folded, a fold leaves both: a scrape reads
    what its journal says are folded once, and the next fold removes them."""
    import app.metrics_files
    from app.metrics_files import fold_ended_processes

    directory, before = counted
    real_remove = os.remove

    def killed_at_the_first_removal(path: str) -> None:
        if path.endswith(".db"):
            raise KeyboardInterrupt
        real_remove(path)

    with monkeypatch.context() as cut:
        cut.setattr(app.metrics_files.os, "remove", killed_at_the_first_removal)
        with pytest.raises(KeyboardInterrupt):
            fold_ended_processes(str(directory))
    assert {".fold-counter.json", "counter_ended.db"} <= set(_files(directory))
    assert _samples(directory) == before  # the files already in `counter_ended.db` are not read again

    assert fold_ended_processes(str(directory)) == 2  # the histograms, which the cut-short fold never reached
    assert _files(directory) == [".fold.lock", "counter_ended.db", "histogram_ended.db"]
    assert _samples(directory) == before


@pytest.mark.parametrize(("killed_at", "left"), [
    ("_write_atomically", {"counter_ended.db.next"}),  # its new file written, its journal not yet
    ("replace", {"counter_ended.db.next", ".fold-counter.json"}),  # both, its new file not yet in place
])
def test_a_fold_cut_short_before_its_file_replaced_the_last_is_undone_by_the_next(
        counted: tuple[Path, Samples], monkeypatch: pytest.MonkeyPatch, killed_at: str, left: set[str]) -> None:
    import app.metrics_files
    from app.metrics_files import fold_ended_processes

    directory, before = counted
    real_replace = os.replace

    def killed(source: str, target: str) -> None:
        if killed_at == "_write_atomically" or source.endswith(".db.next"):
            raise KeyboardInterrupt
        real_replace(source, target)

    with monkeypatch.context() as cut:
        if killed_at == "replace":
            cut.setattr(app.metrics_files.os, "replace", killed)
        else:
            cut.setattr(app.metrics_files, "_write_atomically", killed)
        with pytest.raises(KeyboardInterrupt):
            fold_ended_processes(str(directory))
    files = set(_files(directory))
    assert left <= files and (".fold-counter.json" in files, "counter_ended.db" in files) == (killed_at == "replace",
                                                                                              False)
    assert _samples(directory) == before  # the half-written file is no `.db`: no scrape reads it

    assert fold_ended_processes(str(directory)) == 4
    assert _files(directory) == [".fold.lock", "counter_ended.db", "histogram_ended.db"]
    assert _samples(directory) == before


def test_an_empty_file_is_read_as_no_counts_and_folded_once_its_process_has_ended(
        counted: tuple[Path, Samples]) -> None:
    """prometheus_client creates a process's file before it sizes it, so a scrape can meet an empty file: its
    process has counted nothing yet, or was killed in between and left it so (prometheus/client_python#1199).
    Read as it is, one such file failed every scrape and every fold."""
    from app.metrics_files import fold_ended_processes

    directory, before = counted
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    assert ended.wait(timeout=60) == 0
    living = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (directory / f"counter_{ended.pid}.db").touch()
        (directory / f"histogram_{living.pid}.db").touch()
        assert _samples(directory) == before

        assert fold_ended_processes(str(directory)) == 5  # the two processes' four files, and the empty one
        assert _files(directory) == [".fold.lock", "counter_ended.db", f"histogram_{living.pid}.db",
                                     "histogram_ended.db"]
        assert _samples(directory) == before
    finally:
        living.stdin.close()  # type: ignore[union-attr]
        assert living.wait(timeout=60) == 0


def test_an_api_starting_folds_the_files_its_predecessors_left() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.stack import stack_on_shared_redis

    with stack_on_shared_redis("fold-at-start") as stack:
        ended = [_count_in(stack.metrics_dir) for _ in range(2)]
        assert [process.wait(timeout=60) for process in ended] == [0, 0]
        stack.start_web(web_workers=1)
        names = _files(stack.metrics_dir)
        assert "counter_ended.db" in names
        assert not [name for name in names if name.endswith(tuple(f"_{process.pid}.db" for process in ended))]
        families = text_string_to_metric_families(stack.http.get("/metrics").text)
        assert [sample.value for family in families for sample in family.samples
                if sample.name == "agentq_turns_total"] == [4.0]
