"""The chat page in a real headless Chromium: send, watch the text grow, reload mid-answer, stop."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser import chromium
from tests.support import wait_for


@pytest.fixture(autouse=True)
def _running(workers, upstream) -> None:  # type: ignore[no-untyped-def]
    """Answers are produced by a real worker."""


def assistant_box(driver, message_id: int | None = None):  # type: ignore[no-untyped-def]
    boxes = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.assistant.failed")
    if message_id is not None:
        boxes = [b for b in boxes if b.get_attribute("data-message-id") == str(message_id)]
    return boxes[-1] if boxes else None


def box_text(driver) -> str:  # type: ignore[no-untyped-def]
    box = assistant_box(driver)
    return box.find_element(By.CLASS_NAME, "text").text if box is not None else ""


def test_send_watch_reload_and_stop(world, web_server) -> None:  # type: ignore[no-untyped-def]
    agent_id = world.agent(world.model(upstream="echo;words=80;gap=0.04"))
    _, key = world.user(balance="10")
    with chromium() as driver:
        driver.get(f"{web_server}/")
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "connect").click()
        wait_for(lambda: "balance 10.000000" in driver.find_element(By.ID, "whoami").text, what="connect")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"#agent option[value='{agent_id}']"),
                 what="the agent list")
        Select(driver.find_element(By.ID, "agent")).select_by_value(str(agent_id))
        driver.find_element(By.ID, "content").send_keys("first question")
        driver.find_element(By.ID, "send").click()

        first = wait_for(lambda: len(box_text(driver)) > 10 and box_text(driver), what="streamed text")
        grown = wait_for(lambda: len(box_text(driver)) > len(first) and box_text(driver), what="the text to grow")
        assert grown.startswith(first)
        message_id = int(assistant_box(driver).get_attribute("data-message-id"))

        driver.refresh()
        final = world.wait_terminal(key, message_id)
        wait_for(lambda: assistant_box(driver, message_id) is not None
                 and assistant_box(driver, message_id).get_attribute("data-status") == "success",
                 what="the resumed stream to finish")
        assert assistant_box(driver, message_id).find_element(By.CLASS_NAME, "text").text == final["content"]

        driver.find_element(By.ID, "content").send_keys("second question")
        driver.find_element(By.ID, "send").click()
        wait_for(lambda: assistant_box(driver) is not None
                 and assistant_box(driver).get_attribute("data-message-id") != str(message_id)
                 and len(box_text(driver)) > 10, what="the second answer to stream")
        second_id = int(assistant_box(driver).get_attribute("data-message-id"))
        driver.find_element(By.ID, "stop").click()
        wait_for(lambda: assistant_box(driver, second_id).get_attribute("data-status") == "cancelled",
                 what="the page to show the stop")
        assert "The answer was stopped." in assistant_box(driver, second_id).text
        stored = world.message(key, second_id)
        assert stored["status"] == "cancelled"
        assert assistant_box(driver, second_id).find_element(By.CLASS_NAME, "text").text == stored["content"]


def test_an_agents_name_is_shown_as_text_not_markup(world, web_server) -> None:  # type: ignore[no-untyped-def]
    """An admin-chosen name with markup in it is the option's text; no element of it reaches the page."""
    name = '<img id="injected" src="x">&amp; co'
    agent_id = world.agent(world.model(), name=name)
    _, key = world.user(balance="10")
    with chromium() as driver:
        driver.get(f"{web_server}/")
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "connect").click()
        option = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"#agent option[value='{agent_id}']"),
                          what="the agent list")[0]
        assert option.get_attribute("textContent") == name
        assert driver.find_elements(By.ID, "injected") == []

