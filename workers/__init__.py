"""Dramatiq set-up and actors; `agentq worker` runs `workers.actors`."""
