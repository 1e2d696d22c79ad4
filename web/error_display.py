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


def prefers_chinese(accept_language: str | None) -> bool:
    """True when Chinese ranks first among the languages the client accepts that are written here, Chinese and
    English (by q-value, then order): `fr, zh;q=0.5` asks for Chinese over the English it did not name, and
    `*` stands for English, the default."""
    if not accept_language:
        return False
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept_language.split(",")):
        lang, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                if not 0.0 <= quality <= 1.0:  # a q-value is 0..1 (RFC 9110): `inf`, `nan`, 1.5 are malformed
                    quality = 0.0
        written_here = lang.lower().split("-")[0] in ("zh", "en", "*")
        if written_here and quality > 0:  # q=0 is "not acceptable" (RFC 9110), not the lowest preference
            ranked.append((-quality, index, lang.lower()))
    if not ranked:
        return False
    ranked.sort()
    return ranked[0][2].startswith("zh")


def error_display(status: str, chinese: bool) -> str | None:
    try:
        sentences = _SENTENCES.get(TurnStatus(status))
    except ValueError:
        return None
    if sentences is None:
        return None
    return sentences[1] if chinese else sentences[0]
