"""Where a run's answer goes while it is produced: the seam between calling models (`app.model_calls`) and
publishing a turn's live stream (`app.live_stream_writer`), so that neither imports the other's dependencies
(the stream's users, dead-letter handling among them, do not load the openai SDK)."""

from __future__ import annotations


class AnswerSink:
    """Where streamed text goes while it is produced (the turn's live stream); a no-op by default."""

    def attempt_started(self, model_name: str, restart: bool) -> None:
        """Called before each attempt; `restart` is true when it starts the answer over (a fallback), so that
        what readers hold is matched against its text (`app.live_stream_writer.TurnStream`)."""

    def delta(self, text: str) -> None:
        """Called with each piece of text as it arrives."""
