"""The built-in demo of `make run`: a user with credit, a model served by the mock upstream, an agent.

Running it again reuses what it made (the demo key is kept in a file), so `make run` can be
repeated without piling up demo users; the demo model is pointed at the mock upstream's address of this run.
Made through the same services as an admin's requests (`app.users`, `app.catalog`), with their checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from app.auth import authenticate, new_api_key
from app.catalog import create_agent, create_model, list_agents, list_models, update_model
from app.errors import Unauthorized
from app.users import create_user

DEMO_MODEL = "demo-echo"
DEMO_AGENT = "Demo agent"


@dataclass(frozen=True, slots=True)
class Demo:
    user_id: int
    agent_id: int
    api_key: str


def seed_demo(mock_url: str, key_file: Path) -> Demo:
    # The model first: the catalog refuses an endpoint no worker could reach, before anything else is stored.
    model = next((m for m in list_models() if m.name == DEMO_MODEL), None)
    if model is None:
        model = create_model(name=DEMO_MODEL, model="echo;gap=0.05", base_url=mock_url,
                             input_price_per_1k=Decimal("0.001"), output_price_per_1k=Decimal("0.002"),
                             context_window=8192)
    elif model.base_url != mock_url:  # the demo upstream may listen elsewhere this time (AGENTQ_DEMO_UPSTREAM_PORT)
        update_model(model.id, base_url=mock_url)
    api_key = (key_file.read_text().strip() if key_file.exists() else "") or new_api_key()
    try:
        user_id = authenticate(api_key).id
    except Unauthorized:
        user_id = create_user("demo", is_admin=True, balance=Decimal("100"), api_key=api_key).user.id
    agent = next((a for a in list_agents() if a.name == DEMO_AGENT), None) or create_agent(
        name=DEMO_AGENT, system_prompt="You are a helpful demo agent.", model_id=model.id, timeout_seconds=30)
    demo = Demo(user_id, agent.id, api_key)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    # An administrator's key: readable by its owner alone, as `ssh-keygen` writes a private key (the umask
    # left it readable by every user of the machine).
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file an earlier release wrote keeps its mode through the open
    with os.fdopen(descriptor, "w") as written:
        written.write(api_key + "\n")
    return demo
