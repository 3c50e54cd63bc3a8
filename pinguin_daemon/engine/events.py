"""What the engine tells a session: typed events, produced by the update after each step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TextPiece:
    """A piece of transcript, as the seed's /ws sends it: the word marker becomes a space."""

    text: str  # e.g. " hello" (new word) or "lo" (continuation)
    token: int  # the SentencePiece id
    step: int  # 1-based model step that produced it


@dataclass(frozen=True, slots=True)
class Word:
    """A word is complete (Kyutai's rule): its text and start time in seconds."""

    text: str
    tokens: tuple[int, ...]
    start_time: float


@dataclass(frozen=True, slots=True)
class WordEnd:
    """The end time of the last emitted word, in seconds of the session's audio."""

    stop_time: float


@dataclass(frozen=True, slots=True)
class EndOfTurnProbs:
    """Per VAD head, the probability that the turn has ended (heads for 0.5/1/2/3 s pauses)."""

    step: int
    probs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The engine released the session's slot; no more events follow."""

    reason: str


Event = TextPiece | Word | WordEnd | EndOfTurnProbs | SessionClosed
