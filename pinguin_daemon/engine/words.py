"""Per-session decoding: sampled tokens -> text pieces and timestamped words (Kyutai's rule)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .events import Event, TextPiece, Word, WordEnd

PAD_TOKEN = 3  # the model's "nothing new" token
WORD_BOUNDARY_TOKEN = 0  # closes a word and stamps its end time
SPECIAL_TOKENS = (WORD_BOUNDARY_TOKEN, PAD_TOKEN)
WORD_MARKER = "\u2581"  # SentencePiece's word-start marker, sent as a space


@dataclass(slots=True)
class WordDecoder:
    """Kyutai's ASR word rule (moshi-core asr.rs), for one stream.

    After the first `delay` steps, tokens other than 0/3 accumulate into the current word; a 0 or
    3 after word tokens emits the word with start_time = last_stop_time; a 0 sets
    stop_time = (step - delay) / frame_rate, ends the pending word, and becomes last_stop_time.
    """

    delay: int  # text delay in steps (6 for Kyutai STT 1B)
    piece_of: Callable[[int], str]  # token id -> SentencePiece piece
    text_of: Callable[[Sequence[int]], str]  # token ids -> detokenized text
    frame_rate: float = 12.5
    step: int = 0  # steps decoded so far
    word_tokens: list[int] = field(default_factory=list)  # tokens of the word being spelled
    unended_word: bool = False  # a Word was emitted and its WordEnd is pending
    last_stop_time: float = 0.0  # start time of the next word

    def feed(self, token: int) -> list[Event]:
        """Decode one sampled token into the events it causes."""
        self.step += 1
        events: list[Event] = []
        if token not in SPECIAL_TOKENS:
            events.append(TextPiece(self.piece_of(token).replace(WORD_MARKER, " "), token, self.step))
        if self.step < self.delay:
            return events
        if token in SPECIAL_TOKENS:
            if self.word_tokens:
                tokens = tuple(self.word_tokens)
                self.word_tokens.clear()
                events.append(Word(self.text_of(tokens), tokens, self.last_stop_time))
                self.unended_word = True
        else:
            self.word_tokens.append(token)
        if token == WORD_BOUNDARY_TOKEN:
            stop_time = (self.step - self.delay) / self.frame_rate
            if self.unended_word:
                self.unended_word = False
                events.append(WordEnd(stop_time))
            self.last_stop_time = stop_time
        return events
