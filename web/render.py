"""JSON shapes of the contract, built from the domain's rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, request, stream_with_context

from app.models import Agent, Conversation, ConversationMessage, CreditTransaction, DebugRun, LlmModel, User
from app.models.base import iso_utc
from app.money import render as money
from web.error_display import error_display, prefers_chinese

if TYPE_CHECKING:  # the services whose results are rendered; the `dlq` commands render without loading them all
    from app.dead_letter_requeue import RequeueOutcome
    from app.dead_letters import DeadLetterPage, DeadLetterView
    from app.debugging import CostLine, RouteDecision
    from app.ledger import Credited
    from app.operations import FailureReport, QueueSnapshot
    from app.prompt import Prompt
    from app.users import NewUser
    from app.waiting_retries import WaitingRetry
    from app.worker_presence import WorkerPresence


def no_content() -> Response:
    """A 204: no body, so no Content-Type (Flask's default for an empty string would say text/html)."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else iso_utc(moment)


def wants_chinese() -> bool:
    return prefers_chinese(request.headers.get("Accept-Language"))


def message(m: ConversationMessage, chinese: bool) -> dict[str, Any]:
    """`chinese`: the request's language (`wants_chinese`), asked once by the route, not once a message."""
    return {
        "id": m.id, "conversation_id": m.conversation_id, "seq": m.seq, "role": m.role, "content": m.content,
        "status": m.status, "error_message": m.error_message,
        "error_display": error_display(m.status, chinese),
        "model": m.model, "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
        "total_tokens": m.total_tokens, "cost": money(m.cost), "latency_ms": m.latency_ms,
        "created_at": timestamp(m.created_at), "updated_at": timestamp(m.updated_at),
    }


def conversation(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id, "agent_id": c.agent_id, "project_id": c.project_id, "title": c.title,
        "message_count": c.message_count, "total_tokens": c.total_tokens,
        "created_at": timestamp(c.created_at), "updated_at": timestamp(c.updated_at),
    }


def me(u: User) -> dict[str, Any]:
    return {"id": u.id, "name": u.name, "is_admin": u.is_admin, "balance": money(u.balance),
            "available_balance": money(u.available_balance)}


def new_user(created: NewUser) -> dict[str, Any]:
    """A user with its API key, which only the answer that made the key ever shows."""
    return {**me(created.user), "api_key": created.api_key}


def credited(result: Credited) -> dict[str, Any]:
    """`POST /api/admin/users/{id}/credits`: the contract's `balance`, and the change made."""
    return {"balance": money(result.balance), "credited": money(result.credited)}


def credit_transaction(t: CreditTransaction) -> dict[str, Any]:
    return {"id": t.id, "message_id": t.message_id, "amount": money(t.amount),
            "balance_after": money(t.balance_after), "created_at": timestamp(t.created_at)}


def llm_model(m: LlmModel) -> dict[str, Any]:
    return {
        "id": m.id, "name": m.name, "model": m.model, "base_url": m.base_url, "api_key_env": m.api_key_env,
        "input_price_per_1k": money(m.input_price_per_1k), "output_price_per_1k": money(m.output_price_per_1k),
        "context_window": m.context_window, "created_at": timestamp(m.created_at),
        "updated_at": timestamp(m.updated_at),
    }


def agent_choice(a: Agent) -> dict[str, Any]:
    """What a user picks an agent by: its prompt and models are the operators'."""
    return {"id": a.id, "name": a.name}


def agent(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id, "name": a.name, "system_prompt": a.system_prompt, "model_id": a.model_id,
        "fallback_model_id": a.fallback_model_id, "timeout_seconds": a.timeout_seconds,
        "temperature": a.temperature, "max_tokens": a.max_tokens, "created_at": timestamp(a.created_at),
        "updated_at": timestamp(a.updated_at),
    }


def debug_log(r: DebugRun) -> dict[str, Any]:
    return {
        "id": r.id, "agent_id": r.agent_id, "admin_id": r.admin_id, "status": r.status, "input": r.input,
        "output": r.output, "model": r.model, "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "cost": money(r.cost), "latency_ms": r.latency_ms,
        "error_message": r.error_message, "created_at": timestamp(r.created_at),
    }


def route_decision(d: RouteDecision) -> dict[str, Any]:
    return {"model": d.model, "fallback_model": d.fallback_model, "timeout_seconds": d.timeout_seconds,
            "moderation": d.moderation.label, "moderation_reason": d.moderation.reason,
            "estimated_prompt_tokens": d.estimated_prompt_tokens, "estimated_cost": money(d.estimated_cost)}


def prompt_preview(p: Prompt) -> dict[str, Any]:
    return {"messages": p.messages, "estimated_prompt_tokens": p.estimated_tokens}


def debug_cost(c: CostLine) -> dict[str, Any]:
    return {"key": c.key, "runs": c.runs, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "cost": money(c.cost)}


def queues(snapshot: QueueSnapshot) -> dict[str, Any]:
    return {
        "queues": [{"name": q.name, "ready": q.ready, "delayed": q.delayed, "dead_letters": q.dead}
                   for q in snapshot.queues],
        "turns": snapshot.turns_by_status,
        "test_runs": snapshot.test_runs_by_status,
        "redis_error": snapshot.redis_error,
    }


def failures(report: FailureReport) -> dict[str, Any]:
    return {
        "since": timestamp(report.since),
        "counts": report.counts,
        "items": [{"message_id": f.message_id, "conversation_id": f.conversation_id, "status": f.status,
                   "error_message": f.error_message, "updated_at": timestamp(f.updated_at)}
                  for f in report.latest],
    }


def waiting_retries(retries: list[WaitingRetry]) -> dict[str, Any]:
    """`GET /api/admin/retries` and `agentq dlq retries`."""
    return {"items": [waiting_retry(retry) for retry in retries]}


def waiting_retry(retry: WaitingRetry) -> dict[str, Any]:
    return {"broker_message_id": retry.broker_message_id, "queue": retry.queue, "actor": retry.actor,
            "args": retry.args, "run_id": retry.run_id, "run_status": retry.run_status, "retries": retry.retries,
            "error": retry.error, "retry_at": timestamp(retry.retry_at)}


def worker_processes(presences: list[WorkerPresence]) -> dict[str, Any]:
    """`GET /api/admin/workers` and `agentq workers`."""
    return {"items": [worker_process(presence) for presence in presences]}


def worker_process(presence: WorkerPresence) -> dict[str, Any]:
    return {"instance": presence.id, "host": presence.host, "pid": presence.pid, "threads": presence.threads,
            "running": presence.running, "state": presence.state.value, "started_at": timestamp(presence.started_at),
            "seen_at": timestamp(presence.seen_at)}


def dead_letter_page(page: DeadLetterPage) -> dict[str, Any]:
    return {"items": [dead_letter(view) for view in page.items], "next_cursor": page.next_cursor}


def dead_letter(view: DeadLetterView, *, detail: bool = False) -> dict[str, Any]:
    """The contract's item (`id`, `queue`, `actor`, `args`, `retries`, `error`, `dead_at`) and a little more."""
    row = view.row
    item: dict[str, Any] = {
        "id": row.id, "queue": row.queue, "actor": row.actor, "args": row.args, "retries": row.retries,
        "error": row.error, "dead_at": timestamp(row.dead_at), "run_id": row.run_id, "run_status": view.run_status,
        "in_broker": view.in_broker,
    }
    if detail:
        item["traceback"] = row.traceback
    return item


def requeue_outcome(outcome: RequeueOutcome) -> dict[str, Any]:
    return {"requeued": outcome.requeued,
            "skipped": [{"id": ident, "reason": reason} for ident, reason in outcome.skipped.items()]}


def streamed_items(items: Iterable[dict[str, Any]]) -> Response:
    """`{"items": [...]}` written as the items come, for a list that has no bound: the body is the one
    `jsonify` would build, without the whole list in memory at once."""

    def body() -> Iterator[str]:
        yield '{"items": ['
        for index, item in enumerate(items):
            yield ("," if index else "") + current_app.json.dumps(item)
        yield "]}"

    return Response(stream_with_context(body()), mimetype="application/json")
