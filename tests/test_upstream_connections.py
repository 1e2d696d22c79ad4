"""Upstream connections: kept alive from one streamed turn to the next, dropped when a stream does not end."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import pytest

from tests.support import wait_for, wait_http

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import UpstreamLog, Workers, World


@pytest.fixture(autouse=True)
def _running(workers: Workers, upstream: UpstreamLog) -> None:
    """Turns here run on the session's worker (one process) against the mock upstream."""


def run_turns(world: World, upstream_model: str, contents: list[str]) -> list[dict]:
    agent_id = world.agent(world.model(f"m-{time.monotonic_ns()}", upstream=upstream_model))
    _, key = world.user()
    conversation_id = world.conversation(key, agent_id)
    finished = []
    for content in contents:
        assistant = world.send(key, conversation_id, content).json["assistant_message"]
        finished.append(world.wait_terminal(key, assistant["id"]))
    return finished


def client_ports(upstream: UpstreamLog, model: str) -> list[int]:
    return [r["client_port"] for r in upstream.requests() if r["body"]["model"] == model]


def test_consecutive_turns_share_one_upstream_connection(world: World, upstream: UpstreamLog) -> None:
    model = "echo;words=5"
    upstream.clear()
    finished = run_turns(world, model, ["one", "two", "three"])
    assert [t["status"] for t in finished] == ["success"] * 3
    ports = client_ports(upstream, model)
    assert len(ports) == 3
    assert len(set(ports)) == 1


def test_a_stream_whose_body_stays_open_after_done_ends_the_turn_and_its_connection(
        world: World, upstream: UpstreamLog) -> None:
    model = "echo;hold_after_done=30"
    upstream.clear()
    started = time.monotonic()
    finished = run_turns(world, model, ["held open", "next"])
    assert [t["status"] for t in finished] == ["success", "success"]
    assert [t["content"] for t in finished] == ["echo: held open", "echo: next"]
    assert time.monotonic() - started < 10
    ports = client_ports(upstream, model)
    assert len(ports) == 2
    assert ports[0] != ports[1]
    wait_for(lambda: sorted(upstream.streams().values()) == ["disconnected", "disconnected"],
             what="the mock to see both held connections closed by the worker")


def test_threads_take_turns_over_the_pools_and_each_keeps_its_own(upstream: UpstreamLog) -> None:
    """A process with many threads splits its upstream connections into pools (`ShardedTransport`): thread
    n uses pool n mod shards, and a connection goes back to the pool its thread will use next time."""
    import threading

    import httpx2

    from app import upstream_clients
    from app.upstream_transport import ShardedTransport
    from tests.conftest import MOCK_URL

    upstream_clients.size_pools(8)
    assert upstream_clients._pools_per_client == 1
    upstream_clients.size_pools(33)
    assert upstream_clients._pools_per_client == 2
    upstream_clients.size_pools(1)
    client = httpx2.Client(transport=ShardedTransport(2, httpx2.Limits(max_connections=10)))
    upstream.clear()
    for index in range(4):
        thread = threading.Thread(target=lambda i=index: client.post(
            f"{MOCK_URL}/chat/completions", json={"model": f"echo;word=thread-{i}", "messages": []}).raise_for_status())
        thread.start()
        thread.join()
    client.close()
    ports = {r["body"]["model"].removeprefix("echo;word="): r["client_port"] for r in upstream.requests()}
    assert ports["thread-0"] == ports["thread-2"]
    assert ports["thread-1"] == ports["thread-3"]
    assert ports["thread-0"] != ports["thread-1"]


def test_a_watch_that_fired_before_its_request_was_written_shuts_the_socket_then() -> None:
    """A stop that comes while the connection is still being made fires a watch with no socket yet; the
    socket the request is then written to is shut at once, so the wait for the headers ends."""
    from app.attempt_watchdog import watch_attempt

    stop = threading.Event()
    stop.set()
    watch = watch_attempt(time.monotonic() + 60, stop)
    wait_for(lambda: watch.fired, what="the watch to fire")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(2)
        watch.attach(ours)
        assert ours.recv(1) == b""
    assert watch.fired == "cancelled"


def test_a_detached_socket_is_never_shut_and_the_attempt_stays_watched() -> None:
    """The transport detaches a socket before its connection goes back to the pool (another turn may use it
    next): a stop after that reaches the attempt, and only the socket attached since."""
    from app.attempt_watchdog import watch_attempt

    stop = threading.Event()
    watch = watch_attempt(time.monotonic() + 60, stop)
    pooled, pooled_peer = socket.socketpair()
    redirected, redirected_peer = socket.socketpair()
    with pooled, pooled_peer, redirected, redirected_peer:
        watch.attach(pooled)
        watch.detach(pooled)
        stop.set()
        wait_for(lambda: watch.fired, what="the watch to fire")
        pooled_peer.sendall(b"x")
        pooled.settimeout(2)
        assert pooled.recv(1) == b"x"
        watch.attach(redirected)
        redirected.settimeout(2)
        assert redirected.recv(1) == b""
    assert watch.fired == "cancelled"
    watch.close()


def _attempt_at(host: str, port: int, timeout: float, stop: threading.Event,
                scheme: str = "http") -> tuple[object, float]:
    """One streamed attempt of the real SDK at `host:port` through agentq's client: its result or failure
    and how long it took."""
    from decimal import Decimal

    from app.llm_client import AttemptFailed, stream_chat
    from app.model_target import ModelTarget

    target = ModelTarget(id=0, name=host, model="echo", base_url=f"{scheme}://{host}:{port}/v1",
                         api_key_env=None, input_price_per_1k=Decimal(0), output_price_per_1k=Decimal(0),
                         context_window=None)
    started = time.monotonic()
    try:
        result: object = stream_chat(target, [{"role": "user", "content": "hi"}], timeout_seconds=timeout,
                                     temperature=None, max_tokens=None, on_delta=lambda _text: None, stop=stop)
    except AttemptFailed as failure:
        result = failure
    return result, time.monotonic() - started


def _assert_ends_at_its_stop_and_its_deadline(host: str, port: int, scheme: str = "http") -> None:
    """An attempt at an upstream that never gets connected is `cancelled` soon after a stop at 0.3 s (its
    timeout, 5 s, is half the connect timeout's 10 s cap) and fails at its 1 s timeout as a connection error
    (recorded at no cost: the request was never sent), not as a timeout."""
    from app.llm_client import AttemptFailed

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    stopped, took = _attempt_at(host, port, 5.0, stop, scheme)
    assert isinstance(stopped, AttemptFailed) and stopped.kind == "cancelled"
    assert took < 2.0  # the stop at 0.3 s, against the attempt's 5 s (a first TLS connection loads its CAs)

    timed_out, took = _attempt_at(host, port, 1.0, threading.Event(), scheme)
    assert isinstance(timed_out, AttemptFailed)
    assert (timed_out.kind, timed_out.detail) == ("connection_error", "could not connect within 1s")
    assert 1.0 <= took < 1.8


def test_a_stalled_name_lookup_ends_at_the_attempts_deadline_or_its_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """`getaddrinfo` has no timeout: a name server that does not answer held a new connection for the
    resolver's retries, past the agent's timeout and deaf to a stop. Only the lookup is stood in for (no
    name server here stalls on demand); the SDK's request then goes to the real mock upstream."""
    from app import upstream_connect
    from tests.conftest import MOCK_PORT

    released = threading.Event()
    system_lookup = upstream_connect.resolve_host
    asked: list[str] = []

    def name_service(host: str, port: int) -> list[Any]:
        asked.append(host)
        if host == "stalled.upstream.test":
            released.wait(60)
        return system_lookup("127.0.0.1", port)

    monkeypatch.setattr(upstream_connect, "resolve_host", name_service)
    try:
        _assert_ends_at_its_stop_and_its_deadline("stalled.upstream.test", MOCK_PORT)
        # The two attempts waited for one lookup: a thread each, left until the name service answered, made
        # thousands of threads of a few hundred attempts a second against a stalled resolver.
        assert asked.count("stalled.upstream.test") == 1
        answered, _ = _attempt_at("resolved.upstream.test", MOCK_PORT, 10.0, threading.Event())
        assert getattr(answered, "text", None) == "echo: hi"
    finally:
        released.set()


def test_an_endpoint_at_a_cloud_metadata_address_is_refused_however_it_is_written(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's endpoint at 169.254.169.254 reached the cloud's instance metadata service, its answer shown to the
    admin in the failed call's error. Refused when written (422), the address however the URL writes it (a
    number, hexadecimal, inside IPv6) and the metadata addresses clouds keep outside link-local; and at the
    connect, when a host name resolves there. Only the lookup is stood in for: no name service here answers with
    such an address on demand."""
    from app import upstream_connect
    from app.llm_client import AttemptFailed

    body = {"name": "imds", "model": "echo", "input_price_per_1k": "0", "output_price_per_1k": "0"}
    for url in ("http://169.254.169.254/latest", "http://[fe80::1]/v1", "http://[::ffff:169.254.169.254]/v1",
                "http://2852039166/v1", "http://0xa9fea9fe/v1", "http://[64:ff9b::a9fe:a9fe]/v1",
                "http://[2002:a9fe:a9fe::]/v1", "http://[fd00:ec2::254]/v1", "http://100.100.100.200/v1"):
        refused = world.api.post("/api/admin/models", world.admin_key, {**body, "base_url": url})
        assert (refused.status_code, refused.json["error"]["message"]) == (422, (
            "Invalid value for 'base_url': must not be at a cloud's instance metadata address (link-local, or one a "
            "cloud keeps elsewhere).")), url
    for url in ("http://10.0.0.5/v1", "http://[fd00:ec2::1]/v1", "http://100.100.100.201/v1"):  # private: allowed
        assert world.api.post("/api/admin/models", world.admin_key, {**body, "name": url, "base_url": url}
                              ).status_code == 201, url
    monkeypatch.setattr(upstream_connect, "resolve_host",
                        lambda host, port: socket.getaddrinfo("169.254.169.254", port, type=socket.SOCK_STREAM))
    failed, took = _attempt_at("metadata.upstream.test", 80, 10.0, threading.Event())
    assert isinstance(failed, AttemptFailed) and failed.kind == "connection_error", failed
    assert "connecting to 169.254.169.254:80 was refused: an endpoint must not be at a cloud's instance metadata" in (
        failed.in_full) and took < 2, (failed.in_full, took)


def test_a_stalled_connect_ends_at_the_attempts_deadline_or_its_stop() -> None:
    """A host that drops the connection's SYN (here a real listener whose accept queue is full) held a
    blocking connect for its whole timeout, deaf to a stop; the connect is now waited for a tick at a time."""
    from tests.conftest import MOCK_PORT

    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued.connect(("127.0.0.1", port))

        _assert_ends_at_its_stop_and_its_deadline("127.0.0.1", port)

    answered, _ = _attempt_at("127.0.0.1", MOCK_PORT, 10.0, threading.Event())
    assert getattr(answered, "text", None) == "echo: hi"


def test_a_stalled_tls_handshake_ends_at_the_attempts_deadline_or_its_stop() -> None:
    """A server that accepts the connection and then says nothing (here a real listener that never reads)
    held the TLS handshake for the connect timeout, deaf to a stop."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        _assert_ends_at_its_stop_and_its_deadline("127.0.0.1", listener.getsockname()[1], scheme="https")


def test_an_https_upstream_answers_through_the_bounded_handshake_and_keeps_its_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake agentq runs itself (non-blocking, a tick at a time) against a real TLS server: the
    certificate is verified, the stream is read over the TLS socket, and the connection is reused."""
    import ssl
    import subprocess

    import httpx

    from app.upstream_transport import shared_tls_context
    from tests.conftest import LOG_DIR, child_env
    from tests.support import Process, agentq, free_port

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    trusted = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    server = Process("mock-upstream-tls", agentq("mock-llm", "--port", str(port), "--tls-cert", str(cert),
                                                 "--tls-key", str(key)), child_env(), LOG_DIR).start()
    try:
        wait_http(f"https://127.0.0.1:{port}/_requests", verify=trusted)
        # Read when the process makes its TLS context, once, at its first upstream connection: made again here.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        shared_tls_context.cache_clear()
        for _ in range(2):
            answered, _ = _attempt_at("127.0.0.1", port, 10.0, threading.Event(), scheme="https")
            assert getattr(answered, "text", None) == "echo: hi"
        requests = [r for r in httpx.get(f"https://127.0.0.1:{port}/_requests", verify=trusted).json()
                    if r["path"] == "/v1/chat/completions"]
        assert len(requests) == 2
        assert len({r["client_port"] for r in requests}) == 1
    finally:
        server.kill_group()
        shared_tls_context.cache_clear()


def test_every_endpoints_connections_share_the_processs_one_tls_context() -> None:
    """A TLS context is a CA bundle load, a sixth of a second and 8 MB: made per endpoint, a deployment whose
    models point at a few hundred endpoints held gigabytes of them in every worker process."""
    from app.upstream_clients import client_at
    from app.upstream_transport import ShardedTransport

    transports = [client_at(base_url, None)._client._transport
                  for base_url in ("http://127.0.0.1:1/v1", "https://tenant-a.upstream.test/v1")]
    assert all(isinstance(transport, ShardedTransport) for transport in transports)
    contexts = {id(shard._pool._ssl_context) for transport in transports
                for shard in cast(ShardedTransport, transport)._shards}
    assert len(contexts) == 1


def test_a_lookup_whose_thread_could_not_start_is_not_waited_for_by_the_next_attempts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup is shared by the attempts that need its name while it is in flight; one whose thread could not
    be started (the process out of threads) would have been waited for by every later attempt at that name,
    each failing at its connect timeout, for the life of the process."""
    from app import upstream_connect

    monkeypatch.setattr(upstream_connect, "resolve_host",
                        lambda host, port: socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM))
    started = upstream_connect._Lookup.start
    starts: list[str] = []

    def start_once_out_of_threads(lookup: threading.Thread) -> None:
        starts.append(lookup.name)
        if len(starts) == 1:
            raise RuntimeError("can't start new thread")
        started(lookup)

    monkeypatch.setattr(upstream_connect._Lookup, "start", start_once_out_of_threads)
    with pytest.raises(RuntimeError):
        upstream_connect._lookup_of("short-of-threads.upstream.test", 80)
    lookup = upstream_connect._lookup_of("short-of-threads.upstream.test", 80)
    assert lookup.done.wait(10) and lookup.error is None and len(starts) == 2
