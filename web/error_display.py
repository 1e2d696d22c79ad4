"""Sentences for end users about a turn that did not succeed, in English or Chinese.

`error_message` keeps the technical reason for operators; these are what a chat page shows.
"""

from __future__ import annotations

from app.turn_status import TurnStatus

_SENTENCES: dict[TurnStatus, tuple[str, str]] = {
    TurnStatus.ERROR: ("Something went wrong on our side. Please try again.",
                       "系统出现错误，请稍后重试。"),
    TurnStatus.INSUFFICIENT_BALANCE: ("Your balance is too low for this message. Please top up and try again.",
                                      "余额不足，请充值后重试。"),
    TurnStatus.CONTENT_VIOLATION: ("This message breaks the content policy and was not sent to the model.",
                                   "消息内容违反了内容政策，未发送给模型。"),
    TurnStatus.LLM_ERROR: ("The model is unavailable right now. Please try again in a moment.",
                           "模型暂时不可用，请稍后重试。"),
    TurnStatus.CANCELLED: ("The answer was stopped.", "回答已停止。"),
}


WRITTEN_IN = ("en", "zh")
"""The languages these sentences are written in, by primary tag, the default first."""


def prefers_chinese(accept_language: str | None) -> bool:
    """True when Chinese ranks first among the languages the client accepts that are written here (by q-value,
    then order): `fr, zh;q=0.5` asks for Chinese over the English it did not name. A tag is read by its primary
    subtag (`zh-CN`, `zh_TW`); `*` stands for whichever of the two the client has not refused, English first;
    q=0 refuses (RFC 9110), and a malformed q-value leaves its tag out."""
    if not accept_language:
        return False
    ranked: list[tuple[float, int, str]] = []
    refused: set[str] = set()
    for index, part in enumerate(accept_language.split(",")):
        tag, _, params = part.partition(";")
        primary = tag.strip().lower().replace("_", "-").split("-")[0]
        quality = _quality(params)
        if quality == 0:
            refused.add(primary)
        elif quality is not None and primary:
            ranked.append((-quality, index, primary))
    for _, _, primary in sorted(ranked):
        if primary == "*":
            primary = next((language for language in WRITTEN_IN if language not in refused), "")
        if primary in WRITTEN_IN:
            return primary == "zh"
    return False


def _quality(params: str) -> float | None:
    """A tag's q-value (1 when it has none); None when malformed: `inf`, `nan` or 1.5 is no q-value (0..1)."""
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip() == "q":
            try:
                quality = float(value.strip())
            except ValueError:
                return None
            return quality if 0.0 <= quality <= 1.0 else None
    return 1.0


def error_display(status: str, chinese: bool) -> str | None:
    try:
        sentences = _SENTENCES.get(TurnStatus(status))
    except ValueError:
        return None
    if sentences is None:
        return None
    return sentences[1] if chinese else sentences[0]
