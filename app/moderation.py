"""The moderation policy applied to every input before any model is called.

Blocked terms match anywhere in the text (so Chinese terms, which have no word boundaries, work too),
whatever their case, compatibility forms, combining marks or runs of white space (`folded`).
When `AGENTQ_MODERATION_URL` names an OpenAI-compatible endpoint, its verdict
is asked as well; if that endpoint cannot be reached the input passes and a warning is logged
(fail-open: an outage of the moderation provider must not stop every conversation). Its key is
found as a model's is (`AGENTQ_MODERATION_API_KEY_ENV`, else `OPENAI_API_KEY` on OpenAI's own
endpoint), and its client is kept for the process like a model's.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from functools import cache

from app.config import get_settings

log = logging.getLogger(__name__)

MODERATION_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str | None = None

    @property
    def error_message(self) -> str:
        """What a run refused by moderation records as its error (a turn's, a test run's)."""
        return f"moderation: {self.reason}"

    @property
    def label(self) -> str:
        return "pass" if self.passed else "violation"


def folded(text: str) -> str:
    """Text as blocked terms are matched: case, compatibility forms (full-width letters, ligatures), combining
    marks and runs of white space do not tell two texts apart, or a term was passed by typing it another way
    (in full-width letters, with two spaces, with an accent added to a letter). Decomposed (NFKD), not
    composed: composing merged an added mark into the letter before it, and `kill` followed by an acute
    accent no longer held `kill`."""
    decomposed = unicodedata.normalize("NFKD", text).casefold()
    if not decomposed.isascii():  # ASCII has no marks: most messages skip the walk over every character
        decomposed = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return " ".join(decomposed.split())


@cache
def _folded_terms(terms: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each term with its folded form, folded once for the process's settings rather than at every message."""
    return tuple((term, folded(term)) for term in terms)


def check_blocked_terms(content: str) -> Verdict:
    text = folded(content)
    for term, matched in _folded_terms(tuple(get_settings().blocked_term_list)):
        if matched in text:
            return Verdict(False, f"blocked term {term!r}")
    return Verdict(True)


def _check_endpoint(content: str, url: str) -> Verdict:
    # Imported where an endpoint is asked, not with the policy: the API process and the command line check
    # blocked terms without the openai SDK, whose import is a second of CPU at every process start.
    from app.openai_sdk import openai
    from app.upstream_clients import EndpointUnusable, client_at

    try:
        client = client_at(url, get_settings().moderation_api_key_env)
        flagged = bool(client.moderations.create(input=content, timeout=MODERATION_TIMEOUT_SECONDS)
                       .results[0].flagged)
    except (openai.OpenAIError, EndpointUnusable, IndexError, AttributeError, TypeError) as exc:  # no result
        log.warning("moderation endpoint failed or answered without a result, input passes: %r", exc)
        return Verdict(True)
    if flagged:
        return Verdict(False, "flagged by the moderation endpoint")
    return Verdict(True)


def moderate(content: str) -> Verdict:
    verdict = check_blocked_terms(content)
    url = get_settings().moderation_url
    if verdict.passed and url:
        verdict = _check_endpoint(content, url)
    return verdict
