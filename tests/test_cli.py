"""The `agentq` command's own start-up, in a fresh interpreter as the console script runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import child_env
from tests.support import ROOT, VENV_BIN

STORAGE_AFTER_START = """
import os
from cli.main import main
try:
    main(["--help"])
except SystemExit:
    pass
from prometheus_client import values
print(os.environ["PROMETHEUS_MULTIPROC_DIR"], values.ValueClass.__name__)
"""


def test_counters_go_to_the_shared_directory_when_none_is_configured(tmp_path: Path) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR (the Procfile, `make run`) the command picks a directory that web and
    worker processes share, before prometheus_client is first imported: it chooses in-process storage for
    good at that import, and the API's /metrics would then never see a worker's counter."""
    env = {k: v for k, v in child_env().items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    ran = subprocess.run([str(VENV_BIN / "python"), "-c", STORAGE_AFTER_START], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1].split() == [str(tmp_path / f"agentq-metrics-{os.getuid()}"), "MmapedValue"]
