"""The fallback policy: when a model attempt fails, the run tries its agent's fallback model, once.

Every failure switches: those guarantee 6 names (a timeout, the attempt's own or a provider's HTTP 408; a
connection failure; a 429 and a 5xx; a stream that breaks, goes silent or sends what is not a chat completion
chunk), and also a refusal (400, 401, 403, 404, 422) and an endpoint that cannot be called as configured (its
key's variable not set on the worker). `llm_error` then means what the contract says it does, that the model
and its fallback both failed; a refusal is a request that this provider, or this configuration of it, will not
serve, and the fallback (often another provider) may; LiteLLM and OpenRouter fall back on any error the same
way. The primary's failure stays in sight: its attempt is recorded with its kind and error, logged as a
WARNING naming the fallback, and counted (`agentq_fallbacks_total`). Nothing switches after a stop, with no
time left before the run's deadline, or once the run is no longer this delivery's. The calls themselves are
`app.model_calls`; the claim bounds a delivery by `most_calls`, and a dead delivery's calls are recorded in
`attempt_order`. This module owns the policy's decisions (`attempt_order`, `attempt_seconds`, `switches_after`);
`app.model_calls.call_with_fallback` follows them. It imports nothing heavy, so that the API's processes, which
judge a run's bounds and record a dead worker's calls, never load the HTTP client for it.
"""

from __future__ import annotations

from app.failure_kinds import FailureKind
from app.model_target import ModelTarget


def attempt_order(primary: ModelTarget, fallback: ModelTarget | None, *,
                  fell_back: bool = False) -> list[ModelTarget]:
    """The models a run may call, in the order it calls them: the fallback at most once, after the primary. A
    run that already switched to its fallback in an earlier delivery (whose worker died during the fallback's
    call) calls the fallback alone: the switch happens once a run, not once a delivery."""
    if fallback is None:
        return [primary]
    return [fallback] if fell_back else [primary, fallback]


def most_calls(*, has_fallback: bool) -> int:
    """How many models a run calls at most (`attempt_order`): its deadline gives each call a whole timeout."""
    return 2 if has_fallback else 1


def attempt_seconds(timeout_seconds: float, ends_by: float | None, now: float) -> float:
    """How long the next attempt may take: the agent's timeout, at most what is left of the delivery's model
    time before its run's deadline (`ends_by`, on the same clock as `now`; None: no deadline). Nothing left
    (zero or less) means no attempt: the deadline bounds the whole run, each call within it."""
    return timeout_seconds if ends_by is None else min(timeout_seconds, round(ends_by - now, 3))


def switches_after(failure: FailureKind) -> bool:
    """Whether a failed attempt lets the run call its next model: every failure does but a stop, which ends
    the run's calls (the module's docstring says why a refusal switches too)."""
    return failure is not FailureKind.CANCELLED
