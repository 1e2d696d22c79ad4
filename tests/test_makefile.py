"""`make run` reads its ports and REDIS_URL as every agentq command reads a setting: the environment, else `.env`.

Its recipes are printed by `make -n` in a directory of links to this checkout's Makefile, interpreter and
Procfile, with a `.env` of its own: nothing is started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import ROOT, VENV_BIN, free_port


def _make_run_recipes(directory: Path, dotenv: str | None, *make_arguments: str, **environment: str) -> str:
    for name in ("Makefile", "pyproject.toml", "Procfile.demo"):
        (directory / name).symlink_to(ROOT / name)
    (directory / ".venv").symlink_to(VENV_BIN.parent)
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    env = {name: value for name, value in os.environ.items() if name not in (
        "PORT", "REDIS_URL", "AGENTQ_DEMO_UPSTREAM_PORT", "AGENTQ_SHUTDOWN_GRACE_SECONDS", "MAKEFLAGS", "MAKELEVEL")}
    printed = subprocess.run(["make", "-n", "run", *make_arguments], cwd=directory, env={**env, **environment},
                             capture_output=True, text=True, timeout=60, check=True)
    return printed.stdout


DOTENV = ('REDIS_URL=redis://127.0.0.1:6391/5\nAGENTQ_DEMO_UPSTREAM_PORT=8866\nPORT="8101"\n'
          "AGENTQ_SHUTDOWN_GRACE_SECONDS=7\n")


def test_make_run_takes_its_ports_and_redis_from_dotenv(tmp_path: Path) -> None:
    """`make run` looked for Redis on the default port and seeded the demo model with the mock's default port
    while honcho, reading `.env` itself, started the mock on the port `.env` named: every demo turn failed."""
    recipes = _make_run_recipes(tmp_path, DOTENV)
    assert "url='redis://127.0.0.1:6391/5'" in recipes
    assert "demo seed --mock-url 'http://127.0.0.1:8866/v1'" in recipes
    assert """agentq is starting at http://127.0.0.1:"'8101'""" in recipes
    assert "AGENTQ_WEB_PORT='8101'" in recipes and "AGENTQ_DEMO_UPSTREAM_PORT='8866'" in recipes
    assert "AGENTQ_SHUTDOWN_GRACE_SECONDS='7'" in recipes
    assert "honcho -e /dev/null -f Procfile.demo start" in recipes


def test_make_run_lets_the_environment_and_makes_command_line_win_over_dotenv(tmp_path: Path) -> None:
    """A value given to make is taken as it is, one shell word: a password's `$` or quote is not the shell's."""
    recipes = _make_run_recipes(tmp_path, DOTENV, "PORT=8102", "AGENTQ_SHUTDOWN_GRACE_SECONDS=3",
                                AGENTQ_DEMO_UPSTREAM_PORT="8867", REDIS_URL="redis://:p$w'd@127.0.0.1:6392/4")
    assert "url='redis://:p$w'\\''d@127.0.0.1:6392/4'" in recipes
    assert "demo seed --mock-url 'http://127.0.0.1:8867/v1'" in recipes
    assert """agentq is starting at http://127.0.0.1:"'8102'""" in recipes
    assert "AGENTQ_WEB_PORT='8102'" in recipes and "AGENTQ_DEMO_UPSTREAM_PORT='8867'" in recipes
    assert "AGENTQ_SHUTDOWN_GRACE_SECONDS='3'" in recipes


def test_make_run_without_dotenv_has_the_defaults_and_an_empty_value_counts_as_none(tmp_path: Path) -> None:
    recipes = _make_run_recipes(tmp_path, None, "AGENTQ_DEMO_UPSTREAM_PORT=", PORT="")
    assert "url='redis://127.0.0.1:6379/0'" in recipes
    assert "demo seed --mock-url 'http://127.0.0.1:8765/v1'" in recipes
    assert "AGENTQ_WEB_PORT='8000'" in recipes and "AGENTQ_DEMO_UPSTREAM_PORT='8765'" in recipes
    assert "AGENTQ_SHUTDOWN_GRACE_SECONDS='2'" in recipes
    assert "mkdir -p var && chmod 700 var" in recipes  # the demo administrator's key is in var/demo.json


def test_make_starts_no_local_redis_for_a_redis_url_that_names_another_host(tmp_path: Path) -> None:
    """The recipe took only the port of REDIS_URL: a Redis on another host that did not answer had a local one
    started on its port, which nothing would use."""
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name not in ("REDIS_URL", "MAKEFLAGS", "MAKELEVEL")}
    made = subprocess.run(["make", "--no-print-directory", "-o", "install", "redis",
                           f"REDIS_URL=redis://redis.invalid:{port}/0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "The Redis REDIS_URL names does not answer; make starts only a local one" in made.stderr
    pinged = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=10)
    assert pinged.stdout.strip() != "PONG"
