"""The operator's page at /admin in a real headless Chromium, against real web and worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, hold_answers, release_held_answers
from tests.stack import RedisServer, Stack, drop_database, scratch_database
from tests.support import Process, wait_for


@pytest.fixture(scope="module")
def stack(mock_upstream: Process) -> Iterator[Stack]:
    name = scratch_database("agentq_admin_page")
    redis = RedisServer("admin-page-redis").start()
    services = Stack("admin-page", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis).init()
    services.start_web()
    services.start_worker()
    # The first recovery sweep on a new Redis re-sends every pending turn (it cannot tell a new Redis from
    # one that lost its data), which would give a turn dying meanwhile a second dead letter.
    wait_for(lambda: redis.client().exists(f"{services.key_prefix}:epoch"), what="the first recovery sweep")
    yield services
    services.stop()
    redis.kill()
    drop_database(name)


def dead_turn(stack: Stack, key: str, agent_id: int, content: str) -> int:
    conversation_id = stack.conversation(key, agent_id)
    with stack.claims_fail(conversation_id):
        turn = stack.send(key, conversation_id, content)
        assert stack.wait_terminal(key, turn["id"])["status"] == "error"
    return turn["id"]


def text_of(driver: WebDriver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


@contextmanager
def signed_in(stack: Stack) -> Iterator[tuple[WebDriver, WebDriverWait[WebDriver]]]:
    """The operators' page in a browser, its admin key entered."""
    with chromium() as driver:
        wait: WebDriverWait[WebDriver] = WebDriverWait(driver, 20, poll_frequency=0.1,
                                                       ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{stack.base_url}/admin")
        driver.find_element(By.ID, "api-key").send_keys(stack.admin_key)
        driver.find_element(By.ID, "save-key").click()
        yield driver, wait


def dead_rows(driver: WebDriver) -> list[str]:
    return [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#dead-letters tbody tr")]


def test_the_operators_page_shows_a_dead_letter_and_requeues_and_deletes(stack: Stack) -> None:
    agent_id = stack.agent(stack.model("page-model", "echo"))
    _, key = stack.user("page-user")
    first = dead_turn(stack, key, agent_id, "requeue me from the page")
    second = dead_turn(stack, key, agent_id, "delete me from the page")
    items = stack.call("GET", "/api/admin/dead-letters").json()["items"]
    assert sorted(item["args"][0] for item in items) == sorted([first, second])
    letters = {item["args"][0]: item["id"] for item in items}

    with chromium() as driver:
        wait = WebDriverWait(driver, 20, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{stack.base_url}/admin")
        assert driver.title == "agentq operations"
        wait.until(lambda d: "Enter an admin API key" in text_of(d, "#status"))
        driver.find_element(By.ID, "api-key").send_keys(stack.admin_key)
        driver.find_element(By.ID, "save-key").click()

        wait.until(lambda d: len(dead_rows(d)) == 2)
        row = driver.find_element(By.ID, f"dead-letter-{letters[first]}")
        assert "run_turn" in row.text and f"[{first}]" in row.text
        assert "simulated database failure" in row.text
        assert driver.execute_script("return sessionStorage.getItem('agentq-admin-key')") == stack.admin_key
        queues = text_of(driver, "#queues tbody")
        assert queues.splitlines()[0].split() == ["turns", "0", "0", "2"]
        assert "error 2" in text_of(driver, "#failure-counts tbody")
        assert text_of(driver, "#in-flight tbody").splitlines() == ["turns 0 0", "admin test runs 0 0"]

        row.find_element(By.CSS_SELECTOR, "button.requeue").click()
        wait.until(lambda d: len(dead_rows(d)) == 1)
        # The refresh that followed the action said "Updated …" over its result within milliseconds.
        assert text_of(driver, "#status") == f"Requeue of dead letter {letters[first]} done."
        assert stack.wait_terminal(key, first)["status"] == "success"
        assert stack.message(key, first)["content"] == "echo: requeue me from the page"

        driver.refresh()
        wait.until(lambda d: len(dead_rows(d)) == 1 and "Updated" in text_of(d, "#status"))
        driver.find_element(By.CSS_SELECTOR, f"#dead-letter-{letters[second]} button.delete").click()
        wait.until(lambda d: dead_rows(d) == [])
        wait.until(lambda d: text_of(d, "#queues tbody").splitlines()[0].split() == ["turns", "0", "0", "0"])
        driver.find_element(By.ID, "forget-key").click()  # nothing read with the key stays on screen
        wait.until(lambda d: "Enter an admin API key" in text_of(d, "#status"))
        assert (text_of(driver, "#queues tbody"), text_of(driver, "#failure-counts tbody")) == ("", "")

    assert stack.call("GET", "/api/admin/dead-letters").json()["items"] == []
    assert stack.message(key, second)["status"] == "error"


def test_what_comes_back_for_a_forgotten_key_is_not_shown(stack: Stack) -> None:
    """A refresh asked for with the key, answered after the operator forgot it (a slow network, a loaded API),
    filled the tables again: what only an admin may read stayed on a screen left without a key."""
    with signed_in(stack) as (driver, wait):
        wait.until(lambda d: text_of(d, "#queues tbody") != "")
        hold_answers(driver, "/api/admin/queues")
        driver.find_element(By.ID, "api-key").send_keys(stack.admin_key)
        driver.find_element(By.ID, "save-key").click()  # a refresh now, its queues answered late
        driver.find_element(By.ID, "forget-key").click()
        wait.until(lambda d: "Enter an admin API key" in text_of(d, "#status"))
        release_held_answers(driver)
        assert (text_of(driver, "#queues tbody"), text_of(driver, "#failure-counts tbody"),
                text_of(driver, "#in-flight tbody").splitlines()) == ("", "", ["turns – –", "admin test runs – –"])
        assert "Enter an admin API key" in text_of(driver, "#status")


def test_the_operators_page_refuses_a_users_key(stack: Stack) -> None:
    _, key = stack.user("not-an-admin")
    with chromium() as driver:
        wait = WebDriverWait(driver, 20, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{stack.base_url}/admin")
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "save-key").click()
        wait.until(lambda d: "admin" in text_of(d, "#status").lower()
                   and "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
        assert dead_rows(driver) == []


def test_the_operators_page_shows_the_latest_dead_letters_and_says_so(stack: Stack) -> None:
    """The page asks for a page of the latest letters, not the whole list every few seconds, and says when
    there are more than it shows."""
    stack.sql("INSERT INTO dead_letters (redis_message_id, queue, actor, args, error, dead_at) "
              "SELECT 'page-' || i, 'turns', 'run_turn', '[]', 'boom ' || i, now() - i * interval '1 second' "
              "FROM generate_series(1, 101) AS i")
    try:
        with signed_in(stack) as (driver, wait):
            wait.until(lambda d: len(dead_rows(d)) == 100)
            assert text_of(driver, "#dead-letters-shown") == "(the latest 100 shown)"
            assert " boom 1 " in dead_rows(driver)[0] and " boom 100 " in dead_rows(driver)[-1]
            stack.sql("DELETE FROM dead_letters WHERE redis_message_id = 'page-101'")
            wait.until(lambda d: text_of(d, "#dead-letters-shown") == "" and len(dead_rows(d)) == 100)
    finally:
        stack.sql("DELETE FROM dead_letters WHERE redis_message_id LIKE 'page-%'")


def test_the_pages_load_only_their_own_scripts_and_styles_and_refuse_framing(stack: Stack) -> None:
    """Both pages keep a key in the browser: an inline script, or a frame of the admin page on another site,
    was allowed. Under the policy they send, their own script and stylesheet still run and apply."""
    import httpx

    for path in ("/", "/admin"):
        page = httpx.get(f"{stack.base_url}{path}")
        assert page.status_code == 200
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'; script-src 'self';")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert (page.headers["X-Frame-Options"], page.headers["X-Content-Type-Options"]) == ("DENY", "nosniff")
        assert "<script>" not in page.text and "<style>" not in page.text
        assert (page.headers["Referrer-Policy"], page.headers["Cache-Control"]) == ("no-referrer", "no-store")
    health = httpx.get(f"{stack.base_url}/healthz").headers
    assert (health["X-Content-Type-Options"], health["Referrer-Policy"], health["Cache-Control"]) == (
        "nosniff", "no-referrer", "no-store")
    # An answer that carries a new API key is kept by no cache; the pages' own script is revalidated, not refused.
    created = stack.call("POST", "/api/admin/users", stack.admin_key, json={"name": "cached", "balance": "1"})
    assert (created.status_code, created.headers["Cache-Control"]) == (201, "no-store")
    assert httpx.get(f"{stack.base_url}/static/admin.js").headers["Cache-Control"] == "no-cache"
    with chromium() as driver:
        wait = WebDriverWait(driver, 20, poll_frequency=0.1)
        driver.get(f"{stack.base_url}/admin")
        wait.until(lambda d: "Enter an admin API key" in text_of(d, "#status"))
        assert driver.execute_script("return getComputedStyle(document.body).marginTop") == "24px"


def test_the_operators_page_shows_the_runs_waiting_for_a_retry(stack: Stack) -> None:
    """A run whose delivery failed waits in the broker's delay queue for its retry; the page lists it with
    its retry count and last error, and drops it once the broker no longer holds it."""
    import time

    import dramatiq

    trace = 'Traceback (most recent call last):\n  File "/srv/a.py", line 3, in run\n    claim()\nOSError: boom\n'
    eta = int(time.time() * 1000) + 600_000
    options = {"retries": 2, "traceback": trace, "eta": eta}
    message: dramatiq.Message[None] = dramatiq.Message(queue_name="turns.DQ", actor_name="run_turn", args=(987654,),
                                                       kwargs={}, options=options)
    key = f"{stack.key_prefix}-dramatiq:turns.DQ.msgs"
    client = stack.redis.client()
    client.hset(key, "page-retry", message.encode())
    try:
        with signed_in(stack) as (driver, wait):
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#retries tbody tr"))
            assert text_of(driver, "#retries tbody").startswith("987654 run_turn 2 OSError: boom ")
            client.hdel(key, "page-retry")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#retries tbody tr") == [])
    finally:
        client.hdel(key, "page-retry")


def test_the_operators_page_shows_the_worker_processes(stack: Stack) -> None:
    """Each live worker process, with its threads, the runs it holds and whether it takes new ones."""
    expected = [f"{os.uname().nodename} {pid} 4 0 taking_runs" for pid in stack.workers[0].children()]

    def shown(driver: WebDriver) -> list[str]:
        """Each row but its start time."""
        return [row.text.rsplit(" ", 1)[0] for row in driver.find_elements(By.CSS_SELECTOR, "#workers tbody tr")]

    with signed_in(stack) as (_, wait):
        wait.until(lambda d: shown(d) == expected)
