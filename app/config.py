"""Settings read from the environment (and an optional `.env` file).

One immutable object built once per process; code asks for `get_settings()`
instead of reading `os.environ`, so tests can point a whole process at another
database or Redis by setting variables before it starts. The serving commands'
addresses and sizes (`AGENTQ_HOST`, `PORT`, `AGENTQ_WEB_WORKERS`, …) are not
settings: they are defaults of the command line's options, read by `cli.main`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import ConnectionPool, RedisError
from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app import endpoint_urls

DEFAULT_SQLITE_PATH = Path("var") / "agentq.sqlite3"
SQLITE_SCHEMES = ("sqlite", "sqlite+pysqlite")
DAY = 86_400
YEAR = 365 * DAY
"""Upper bounds of durations: past them a setting is a typo, and one past the calendar's range failed every
request that added it to a date (an `OverflowError` answered 500), long after the process had started."""
Seconds = Annotated[float, Field(gt=0, le=DAY)]
"""A wait or a period: more than nothing, at most a day."""
BackoffMs = Annotated[int, Field(ge=1, le=DAY * 1000)]
"""At least 1 ms: Dramatiq reads a backoff of 0 as "not given", so 0 meant its defaults (15 s at least, a
week at most: retries days apart, and no outage waited out at a settlement)."""


class Settings(BaseSettings):
    """Every knob of agentq; `AGENTQ_` prefixed except the two URLs the contract names."""

    model_config = SettingsConfigDict(env_file=".env", env_prefix="AGENTQ_", extra="ignore", frozen=True,
                                      allow_inf_nan=False)

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_SQLITE_PATH}", validation_alias="DATABASE_URL"
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")

    max_active_conversations: int = Field(default=3, ge=1, le=1_000_000)
    max_turns_per_minute: int = Field(default=0, ge=0, le=1_000_000)
    dedup_window_seconds: int = Field(default=300, ge=0, le=YEAR)
    max_content_chars: int = Field(default=32000, ge=1, le=10_000_000)
    blocked_terms: str = ""
    moderation_url: str | None = None
    moderation_api_key_env: str | None = None
    metrics_snapshot_seconds: float = Field(default=1.0, ge=0, le=60)
    metrics_token: SecretStr | None = Field(default=None, min_length=16, max_length=500)
    """When set, /metrics answers only a scraper that sends it as a bearer token."""
    model_key_variables: str = Field(default="*_API_KEY", min_length=1, max_length=2000)
    """Shell-style patterns, comma-separated, of the variables a model's `api_key_env` may name."""

    lease_seconds: Seconds = 30.0
    recovery_interval_seconds: Seconds = 5.0
    enqueue_grace_seconds: Seconds = 5.0
    stale_pending_seconds: float = Field(default=300.0, gt=0, le=YEAR)
    max_pending_seconds: float = Field(default=900.0, gt=0, le=YEAR)
    turn_grace_seconds: float = Field(default=60.0, ge=0, le=DAY)
    default_max_tokens: int = Field(default=1024, ge=1, le=10_000_000)
    default_context_window: int = Field(default=8192, ge=256, le=100_000_000)
    max_retries: int = Field(default=3, ge=0, le=10_000)
    outage_retries: int = Field(default=20, ge=0, le=1_000_000)
    max_deliveries: int = Field(default=5, ge=1, le=500)
    min_backoff_ms: BackoffMs = 1000
    max_backoff_ms: BackoffMs = 30000
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=DAY)
    broker_heartbeat_ms: int = Field(default=15000, ge=1000, le=DAY * 1000)
    broker_maintenance_chance: int = Field(default=100_000, ge=1, le=1_000_000)
    broker_namespace: str = "agentq-dramatiq"
    broker_poll_ms: int = Field(default=1000, ge=10, le=60_000)
    redis_key_prefix: str = "agentq"

    stream_maxlen: int = Field(default=10000, ge=100, le=100_000_000)
    stream_ttl_seconds: int = Field(default=3600, ge=60, le=YEAR)
    stream_ended_ttl_seconds: int = Field(default=60, ge=1, le=YEAR)
    stream_heartbeat_seconds: Seconds = 15.0
    stream_max_seconds: float = Field(default=10800.0, gt=0, le=YEAR)
    """Past the longest turn the defaults allow (pending 900 s, two attempts of 3600 s, the grace and a
    recovery: about 8,200 s), so that a reader who connects as a turn is accepted is sent its `done` on one
    response, as the contract reads, and only a reader of an answer longer than that reconnects."""
    stream_write_timeout_seconds: Seconds = 30.0
    client_timeout_seconds: Seconds = 60.0
    schema_lock_timeout_seconds: Seconds = 10.0
    max_streams_per_user: int = Field(default=32, ge=1, le=1_000_000)
    cancel_wait_seconds: float = Field(default=2.0, ge=0, le=60)

    db_pool_size: int = Field(default=10, ge=1, le=10_000)
    db_max_overflow: int = Field(default=0, ge=0, le=10_000)
    db_pool_timeout_seconds: Seconds = 30.0
    db_connect_timeout_seconds: int = Field(default=5, ge=2, le=DAY)
    db_answer_timeout_seconds: Seconds = 15.0
    """How long a process waits for its PostgreSQL server's answer to what it sent (`app.connection_bounds`)."""
    log_json: bool = False
    access_log: bool = False
    """One line for each request `agentq web` answers (gunicorn's access log, in agentq's log format)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("database_url")
    @classmethod
    def _served_database(cls, url: str) -> str:
        """A URL of a database this installation serves, refused at start rather than at the first query: a
        bare `postgresql://` would pick psycopg2 (not installed), so it is given psycopg; another database, or
        an in-memory SQLite one (one per process: the API's and the workers' would differ), is refused."""
        scheme, _, rest = url.partition("://")
        if scheme in ("postgresql", "postgres"):
            scheme, url = "postgresql+psycopg", f"postgresql+psycopg://{rest}"
        in_memory = scheme in SQLITE_SCHEMES and rest.removeprefix("/") in ("", ":memory:")
        if scheme not in (*SQLITE_SCHEMES, "postgresql+psycopg") or in_memory:
            raise ValueError("must be a SQLite file's URL (sqlite:///path/to/file) or a PostgreSQL one "
                             "(postgresql://user@host/database)")
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:  # a port that is not a number, an unclosed IPv6 bracket
            raise ValueError(f"is not a database URL that can be read: {exc}") from None
        named = parsed.database or {"dbname", "service"} & set(parsed.query) or {"PGDATABASE", "PGSERVICE"} & set(
            os.environ)
        if scheme == "postgresql+psycopg" and not named:
            # libpq would pick the database named after the user, and `db init` write agentq's tables there.
            raise ValueError("must name its database (postgresql://user@host/database, or a service's, or "
                             "PGDATABASE's)")
        return url

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """Refused at start, with the other settings, rather than by the first command that connects. A
        database number that is not one (`/abc`) is refused too: redis-py drops it and uses database 0,
        which may be another deployment's."""
        try:
            parse_url(url)
            ConnectionPool.from_url(url).make_connection()  # its options, read without connecting
        except (TypeError, ValueError, RedisError) as exc:
            raise ValueError(f"must be a Redis URL (redis://host:port/db, rediss://…, unix://…): {exc}") from None
        database = urlsplit(url).path.strip("/") if url.startswith(("redis://", "rediss://")) else ""
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"the database after the port must be a number, not {database!r}")
        return url

    @field_validator("moderation_url")
    @classmethod
    def _moderation_url(cls, url: str | None) -> str | None:
        """A moderation endpoint that cannot be called fails open at every turn (a provider outage must not
        stop every conversation), so a mistyped one would quietly turn moderation off: refused at start."""
        if url is not None and (refused := endpoint_urls.refusal(url, endpoint_urls.MODERATION_PATH)) is not None:
            raise ValueError(refused)
        return url

    @model_validator(mode="after")
    def _settings_that_work_together(self) -> Settings:
        """Pairs each valid alone that together break what they set, refused at start with both named."""
        if self.default_max_tokens >= self.default_context_window:
            raise ValueError(
                f"AGENTQ_DEFAULT_MAX_TOKENS ({self.default_max_tokens}) must be less than "
                f"AGENTQ_DEFAULT_CONTEXT_WINDOW ({self.default_context_window}): the prompt keeps room for the "
                "answer, and a model that declares neither would be sent no history at all")
        if self.stale_pending_seconds * 1000 < 2 * self.max_backoff_ms:
            raise ValueError(
                f"AGENTQ_STALE_PENDING_SECONDS ({self.stale_pending_seconds:g}) must be at least twice "
                f"AGENTQ_MAX_BACKOFF_MS ({self.max_backoff_ms} ms): a run handed to Dramatiq's retry is left to "
                "it that long, and the recovery sweep would send a second message while the retry waits out its "
                "backoff, both deliveries counting towards AGENTQ_MAX_DELIVERIES")
        return self

    def answer_limit(self, max_tokens: int | None) -> int:
        """The longest answer a turn may get: its agent's `max_tokens`, else `AGENTQ_DEFAULT_MAX_TOKENS`.
        Sent upstream, so that the prompt's room for the answer and the reservation, which price it, hold."""
        return max_tokens or self.default_max_tokens

    def context_window(self, declared: int | None) -> int:
        """A model's context window: its own, else `AGENTQ_DEFAULT_CONTEXT_WINDOW`; what the prompt is cut to
        fit, and what tells whether a fallback could take a prompt its primary refused as too long."""
        return declared or self.default_context_window

    @property
    def blocked_term_list(self) -> list[str]:
        return [t.strip().casefold() for t in self.blocked_terms.split(",") if t.strip()]

    @property
    def model_key_variable_patterns(self) -> list[str]:
        return [p.strip() for p in self.model_key_variables.split(",") if p.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def unknown_settings(environment: Mapping[str, str], others: tuple[str, ...]) -> list[str]:
    """The `AGENTQ_` variables set that no setting reads, nor one of `others` (names, or beginnings of names,
    its caller reads itself), each with the setting it is nearest to: settings ignore variables they do not
    know, so a misspelt `AGENTQ_LEASE_SECOND` left the default in force without a word."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = [field.validation_alias if isinstance(field.validation_alias, str) else f"{prefix}{name.upper()}"
             for name, field in Settings.model_fields.items()]
    names.append(environment.get(f"{prefix}MODERATION_API_KEY_ENV", ""))  # a variable a setting names is read too
    # Compared without the prefix most names share, which alone made any two names look alike.
    bare = {name.removeprefix(prefix): name for name in names}
    problems = []
    for variable in sorted(environment):
        if variable.startswith(prefix) and variable not in names and not variable.startswith(others):
            nearest = difflib.get_close_matches(variable.removeprefix(prefix), list(bare), n=1, cutoff=0.75)
            problems.append(f"{variable} is not a setting of agentq, and is ignored"
                            + (f" (is it {bare[nearest[0]]}?)" if nearest else ""))
    return problems


def describe_invalid_settings(error: ValidationError) -> str:
    """Each invalid setting by the variable an operator sets, not by the field's name, without pydantic's
    links: e.g. `AGENTQ_MAX_ACTIVE_CONVERSATIONS='0': Input should be greater than or equal to 1`."""
    prefix = Settings.model_config.get("env_prefix", "")
    problems = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # settings that do not work together: the message names them and their values
            problems.append(message)
            continue
        name = str(problem["loc"][0])
        variable = f"{prefix}{name.upper()}" if name in Settings.model_fields else name  # else it is an alias
        if name in _SECRETS:  # a mistyped secret is still a secret: its length is all an operator needs
            value, message = "<hidden>", message.replace(" items", " characters")
        else:
            value = without_password(repr(problem.get("input")))
        problems.append(f"{variable}={value}: {message}")
    return "; ".join(problems)


_SECRETS = {name for name, field in Settings.model_fields.items() if SecretStr in get_args(field.annotation)}


def without_password(text: str) -> str:
    """A URL (or a text that holds one) without its password, which is not printed into a terminal or a process
    manager's log: the user part's, up to the last `@` before the query (redis-py reads a password up to the
    last `@`, SQLAlchemy lets one hold a `/`), and a `password=` option of the query."""
    text = re.sub(r"(://[^:/@\s]*:)[^\s'\"?#]*@", r"\1***@", text)
    return re.sub(r"([?&]password=)[^&\s'\"]*", r"\1***", text)


