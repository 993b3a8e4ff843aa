"""Support triage: classify a ticket, detect its language and mood, then escalate or reply.

The flow::

    classify ──┐
    language ──┼──> route ──escalate──> summarize_for_agent ──> open_escalation
    sentiment ─┘          └─auto──────> draft_reply

``classify``, ``detect_language`` and ``sentiment`` take only the ticket, so they run at the
same time; ``route`` (an ``@fd.branch``) waits for all three and picks one case.  Only the
chosen case runs; the other is recorded as skipped.

The LLM calls are ``fd.llm.chat(...)``.  By default they reach
:class:`flowdsl.testing.FakeLLM`, scripted with keyword rules (:func:`stand_in`), so this
example runs with no API key and no network.  With ``OPENAI_API_KEY`` set they go to OpenAI
(``TRIAGE_MODEL``, default ``gpt-4o-mini``), with ``ANTHROPIC_API_KEY`` to Anthropic
(default ``claude-3-5-haiku-latest``): the flow does not change.

Run it::

    python examples/support_triage.py                 # triage the sample tickets
    flowdsl run examples/support_triage.py:support_triage \\
        --input '{"id": "T-9", "text": "My invoice is wrong"}'
    flowdsl graph examples/support_triage.py:support_triage
"""

from __future__ import annotations

import enum
import os
import re
import time
from typing import Any

import anyio
import attrs

import flowdsl as fd
from flowdsl.testing import FakeLLM

# --- the values that cross steps: attrs classes and enums, carried by flowdsl's codec -----


class Label(enum.Enum):
    BILLING = "billing"
    BUG = "bug"
    ACCOUNT = "account"
    QUESTION = "question"


class Sentiment(enum.Enum):
    ANGRY = "angry"
    NEUTRAL = "neutral"
    HAPPY = "happy"


class Action(enum.Enum):
    ESCALATED = "escalated"
    AUTO_REPLIED = "auto-replied"


@attrs.frozen
class Ticket:
    id: str
    text: str


@attrs.frozen
class Triage:
    label: Label
    confidence: float


@attrs.frozen
class Resolution:
    ticket_id: str
    action: Action
    label: Label
    language: str
    sentiment: Sentiment
    message: str
    team: str | None = None


# --- the stand-in for an LLM: keyword rules, scripted into a FakeLLM ----------------------

_LABEL_WORDS: dict[Label, tuple[str, ...]] = {
    Label.BILLING: (
        "invoice",
        "charged",
        "charge",
        "refund",
        "payment",
        "bill",
        "facture",
        "rechnung",
        "factura",
        "cobro",
    ),
    Label.BUG: ("crash", "error", "broken", "bug", "freezes", "plante", "absturz", "fehler"),
    Label.ACCOUNT: (
        "password",
        "log in",
        "login",
        "sign in",
        "account",
        "mot de passe",
        "passwort",
        "contraseña",
        "cuenta",
    ),
}
_LANGUAGE_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("the", "is", "my", "a", "not", "and", "i", "it", "thanks", "to"),
    "fr": ("le", "la", "les", "est", "je", "mon", "ma", "une", "pas", "merci"),
    "de": ("der", "die", "das", "ist", "ich", "mein", "meine", "nicht", "und", "danke"),
    "es": ("el", "los", "las", "es", "mi", "una", "no", "por", "gracias", "que"),
}
_ANGRY = (
    "unacceptable",
    "furious",
    "worst",
    "ridiculous",
    "inacceptable",
    "sofort",
    "again!",
    "!!",
)
_HAPPY = ("thanks", "thank you", "love", "great", "merci", "danke", "gracias")
_TEAMS = {
    Label.BILLING: "billing",
    Label.BUG: "engineering",
    Label.ACCOUNT: "identity",
    Label.QUESTION: "support",
}
_GREETING = {"en": "Hello", "fr": "Bonjour", "de": "Hallo", "es": "Hola"}
_ANSWER = {
    Label.BILLING: "we have checked your invoice and sent you a corrected copy.",
    Label.ACCOUNT: "you can reset your password at https://example.com/reset.",
    Label.BUG: "we have logged the problem and will write when it is fixed.",
    Label.QUESTION: "thank you for asking: the answer is in our help centre.",
}


def stand_in(prompt: str) -> str | Triage:
    """Answer a prompt below by keyword rules.

    A prompt is an instruction, a blank line, then the ticket's text; the instruction's
    first word says which rule answers.
    """
    task, _, text = prompt.partition("\n\n")
    verb = task.split(maxsplit=1)[0].lower()
    if verb == "classify":
        return _classify(text)
    rules = {"name": _language, "rate": _sentiment, "summarize": _summary}
    return rules[verb](text)


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def _classify(text: str) -> Triage:
    lowered = text.lower()
    scores = {label: sum(w in lowered for w in words) for label, words in _LABEL_WORDS.items()}
    label, score = max(scores.items(), key=lambda item: item[1])
    if not score:
        return Triage(Label.QUESTION, 0.5)
    return Triage(label, round(min(0.5 + 0.2 * score, 0.95), 2))


def _language(text: str) -> str:
    words = _words(text)
    scores = {lang: sum(w in common for w in words) for lang, common in _LANGUAGE_WORDS.items()}
    return max(scores, key=lambda lang: scores[lang])  # no evidence, or a tie: the first, en


def _sentiment(text: str) -> str:
    lowered = text.lower()
    if any(w in lowered for w in _ANGRY):
        return "angry"
    if any(w in lowered for w in _HAPPY):
        return "happy"
    return "neutral"


def _summary(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 72 else text[:69] + "..."


def provider() -> Any:
    """OpenAI or Anthropic when a key is set; else the scripted stand-in."""
    if os.environ.get("OPENAI_API_KEY"):
        return fd.llm.OpenAI(model=os.environ.get("TRIAGE_MODEL", "gpt-4o-mini"))
    if os.environ.get("ANTHROPIC_API_KEY"):
        return fd.llm.Anthropic(model=os.environ.get("TRIAGE_MODEL", "claude-3-5-haiku-latest"))
    latency = float(os.environ.get("TRIAGE_LATENCY", "0.2"))  # a real model takes a while too
    return FakeLLM(stand_in, latency=latency)


# The one place the example reaches its model; tests swap it for a faster one.
llm = provider()


async def ask(prompt: str) -> str:
    reply = await fd.llm.chat(prompt, llm=llm)
    return reply.text.strip()


# --- the steps --------------------------------------------------------------------------------


@fd.step(retries=2)
async def classify(ticket: Ticket) -> Triage:
    reply = await fd.llm.chat(
        f"Classify this ticket as billing, bug, account or question, with a confidence."
        f"\n\n{ticket.text}",
        llm=llm,
        response_model=Triage,
    )
    triage: Triage = reply.parsed
    return triage


@fd.step(retries=2)
async def detect_language(ticket: Ticket) -> str:
    code = await ask(f"Name the ISO 639-1 code of this ticket's language.\n\n{ticket.text}")
    return code.lower()[:2]


@fd.step(retries=2)
async def sentiment(ticket: Ticket) -> Sentiment:
    tone = await ask(f"Rate this ticket's tone: angry, neutral or happy.\n\n{ticket.text}")
    for mood in Sentiment:
        if mood.value in tone.lower():
            return mood
    return Sentiment.NEUTRAL


@fd.branch
async def route(triage: Triage, mood: Sentiment) -> str:
    # Angry customers and bugs go to a person; everything else gets an answer right away.
    if mood is Sentiment.ANGRY or triage.label is Label.BUG:
        return "escalate"
    return "auto"


@fd.step
async def summarize_for_agent(ticket: Ticket, triage: Triage, mood: Sentiment) -> str:
    summary = await ask(f"Summarize this ticket in one sentence.\n\n{ticket.text}")
    return f"[{triage.label.value}, {mood.value}] {summary}"


@fd.step
async def open_escalation(
    ticket: Ticket, triage: Triage, mood: Sentiment, language: str, summary: str
) -> Resolution:
    return Resolution(
        ticket_id=ticket.id,
        action=Action.ESCALATED,
        label=triage.label,
        language=language,
        sentiment=mood,
        message=summary,
        team=_TEAMS[triage.label],
    )


@fd.step
async def draft_reply(ticket: Ticket, triage: Triage, mood: Sentiment, language: str) -> Resolution:
    greeting = _GREETING.get(language, _GREETING["en"])
    return Resolution(
        ticket_id=ticket.id,
        action=Action.AUTO_REPLIED,
        label=triage.label,
        language=language,
        sentiment=mood,
        message=f"{greeting}! About ticket {ticket.id}: {_ANSWER[triage.label]}",
    )


@fd.flow
async def support_triage(ticket: Ticket) -> Resolution:
    # Three calls that take only the ticket: they run concurrently.
    triage = await classify(ticket)
    language = await detect_language(ticket)
    mood = await sentiment(ticket)

    async def escalate() -> Resolution:
        summary = await summarize_for_agent(ticket, triage, mood)
        return await open_escalation(ticket, triage, mood, language, summary)

    return await route(triage, mood).cases(
        escalate=escalate,
        auto=lambda: draft_reply(ticket, triage, mood, language),
    )


SAMPLE_TICKETS = [
    Ticket("T-1", "I was charged twice for my subscription this month, please refund one."),
    Ticket("T-2", "The app crashes with an error every time I open the settings page."),
    Ticket("T-3", "Je ne peux pas me connecter, j'ai oublié mon mot de passe."),
    Ticket("T-4", "Das ist inakzeptabel!! Meine Rechnung ist falsch, ich will sofort Geld zurück."),
    Ticket("T-5", "Do you ship to Canada? Thanks, I love the product."),
]


async def main() -> None:
    started = time.perf_counter()
    async with fd.Context() as ctx, anyio.create_task_group() as tg:
        for ticket in SAMPLE_TICKETS:
            tg.start_soon(_triage_and_print, ctx, ticket, started)


async def _triage_and_print(ctx: fd.Context, ticket: Ticket, started: float) -> None:
    result = await ctx.run(support_triage, ticket)
    elapsed = time.perf_counter() - started
    team = f" -> team {result.team}" if result.team else ""
    headline = (
        f"{elapsed:5.2f}s  {result.ticket_id}  {result.action.value:<12} "
        f"{result.label.value:<8} {result.language}  {result.sentiment.value:<7}{team}"
    )
    print(f"{headline.rstrip()}\n        {result.message}", flush=True)


if __name__ == "__main__":
    anyio.run(main)
