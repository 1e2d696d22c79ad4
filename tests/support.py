"""Helpers shared by the tests: waiting on conditions, free ports, real processes."""

from __future__ import annotations

import atexit
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")


def wait_for(condition: Callable[[], T | Literal[False] | None], timeout: float = 20.0, interval: float = 0.02,
             what: str = "") -> T:
    """Poll until `condition()` is truthy and return it; fail the test with `what` when time runs out."""
    deadline = time.monotonic() + timeout
    last: T | Literal[False] | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}; last value {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list[Process] = []
_logs_opened: set[Path] = set()
"""The process logs this run has written: a log left by an earlier run with the same log directory is emptied
before its first use here, so a test that counts a process's lines counts only this run's."""


def _stop_leftovers() -> None:
    """A test that failed before stopping what it started leaves no process behind the run (a worker left
    running would take the next run's turns)."""
    for process in _started:
        process.kill_group(signal.SIGKILL)


atexit.register(_stop_leftovers)


class Process:
    """A real child process (agentq web, agentq worker, the mock upstream) with its output in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = self.log_path.open("ab" if self.log_path in _logs_opened else "wb")
        _logs_opened.add(self.log_path)
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      start_new_session=True)
        _started.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        self.kill_group(signal.SIGTERM)

    @contextmanager
    def held(self) -> Iterator[None]:
        """The whole process group stopped (SIGSTOP) for the block: a worker booted beforehand that takes no
        part until the moment a test chooses, so that what it measures from there holds no boot time."""
        os.killpg(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.pid, signal.SIGCONT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SilentServer:
    """A port that takes connections and never answers: a Redis hung past its clients' socket timeout, for real
    clients to wait on, not a stand-in for their calls."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                self.connections.append(self._listener.accept()[0])
        except OSError:  # the listener closed
            return

    def hang_up(self) -> None:
        """Close the connections taken so far: each client waiting on one fails at once."""
        for connection in list(self.connections):
            connection.close()

    def close(self) -> None:
        self._listener.close()
        self.hang_up()


class CannedUpstream:
    """An OpenAI-compatible endpoint of the test's own that answers each chat request with the response written
    for its `model` (a status and a body sent as they are): what a provider or a gateway does that the mock
    upstream does not, for the real openai SDK in a real worker to meet. Its `base_url` is the model's."""

    def __init__(self, answers: dict[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                canned.requests.append(body)
                status, answer = canned.answers[body["model"]]
                self.send_response(status)
                self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def stream(*chunks: dict[str, Any]) -> tuple[int, bytes]:
        """A 200 streaming these chat completion chunks' fields (each given its `object`), then `[DONE]`."""
        events = [f"data: {json.dumps({'id': 'canned', 'object': 'chat.completion.chunk', **chunk})}\n\n"
                  for chunk in chunks]
        return 200, "".join([*events, "data: [DONE]\n\n"]).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TcpRelay:
    """A loopback port relayed to another: one process's own way to a service (a worker's to PostgreSQL),
    which a test cuts (every connection through it closed, new ones refused) and mends, while the other
    processes still reach the service directly. A partition of that process's host, not a stand-in for the
    service: the bytes are the real server's."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target_port = target_port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self.mend()

    def mend(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def point_at(self, target_port: int) -> None:
        """New connections go to `target_port`; those made already stay where they were, as after a DNS name
        or a proxy moved to another server."""
        self._target_port = target_port

    def cut(self) -> None:
        """A shut-down listener refuses connections at once (closing it alone leaves the port listening while
        its `accept` waits), and each relayed connection's peers see it closed."""
        with self._lock:
            listener, self._listener = self._listener, None
            relayed, self._sockets = self._sockets, []
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in relayed:
            _hang_up(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:  # the listener shut down
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target_port))
            except OSError:  # the service refused: so does the relay
                _hang_up(client)
                continue
            with self._lock:
                cut_meanwhile = self._listener is not listener
                if not cut_meanwhile:
                    self._sockets += [client, server]
            if cut_meanwhile:  # taken as the relay was cut: closed as the cut closed the others
                _hang_up(client)
                _hang_up(server)
                continue
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for connection in (source, sink):
            _hang_up(connection)


def _hang_up(connection: socket.socket) -> None:
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()


def refused_connection() -> psycopg.OperationalError:
    """A real driver's error for a connection refused (to a port nothing listens on)."""
    try:
        psycopg.connect(f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=2")
    except psycopg.OperationalError as error:
        return error
    raise AssertionError("a closed port accepted a connection")


def wait_http(url: str, timeout: float = 30.0, verify: ssl.SSLContext | bool = True) -> None:
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=1.0, verify=verify).status_code < 500
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=timeout, interval=0.1, what=url)


@contextmanager
def refusing(run_sql: Callable[[str], object], name: str, table: str, event: str, when: str,
             message: str = "simulated database failure", after_seconds: float = 0) -> Iterator[None]:
    """While the block runs, PostgreSQL refuses the `event` (INSERT or UPDATE) of a row of `table` for which
    `when` holds with a database error (`after_seconds` into the statement): a failure at a chosen step of a
    real turn. `run_sql` runs one statement on the database under test; `name` names the trigger and its
    function."""
    run_sql(f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({float(after_seconds)}); RAISE EXCEPTION '{message}'; END $$")
    run_sql(f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {name}()")
    try:
        yield
    finally:
        run_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")


def agentq(*args: str) -> list[str]:
    return [str(VENV_BIN / "agentq"), *args]


def run_to_end(argv: list[str] | list[bytes], env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """Run one command to its end in a group of its own; its exit status, stdout and stderr. A command expected
    to refuse to start (a worker) that started after all runs a group of processes: none may outlive the test."""
    command = subprocess.Popen(argv, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = command.communicate(timeout=timeout)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    return command.returncode, stdout, stderr


class SseEvent:
    def __init__(self, event: str, data: str, ident: str | None) -> None:
        self.event = event
        self.data = data
        self.id = ident

    def json(self) -> Any:
        import json

        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"SseEvent({self.event!r}, {self.data[:60]!r}, id={self.id!r})"


def read_sse(url: str, key: str, last_event_id: str | None = None, stop_after: int | None = None,
             timeout: float = 60.0, connected: threading.Event | None = None) -> list[SseEvent]:
    """Read an event stream until `done` (or `stop_after` delta events, then drop the connection); `connected`
    is set once the server answered, for a test that must know its reader is there before what it watches."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[SseEvent] = []
    deltas = 0
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        if connected is not None:
            connected.set()
        event, ident = "message", None
        data: list[str] = []
        for line in response.iter_lines():
            if line == "":
                if data:
                    events.append(SseEvent(event, "\n".join(data), ident))
                    if event == "done":
                        return events
                    if event == "delta":
                        deltas += 1
                        if stop_after is not None and deltas >= stop_after:
                            return events
                event, data, ident = "message", [], None
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    ident = value
    return events


def visible_text(events: list[SseEvent]) -> str:
    """What a client shows: deltas concatenated, cleared by a `status` event that says `restart`."""
    text = ""
    for event in events:
        if event.event == "status" and event.json().get("restart"):
            text = ""
        elif event.event == "delta":
            text += event.json()["text"]
    return text
