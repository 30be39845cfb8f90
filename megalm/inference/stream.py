"""Token ids -> text, piece by piece, exact where a character spans several tokens (byte-level BPE).

Decoding each token alone would print U+FFFD for half of a multi-byte character and can lose the leading space
some decoders strip at the start of a text. IncrementalDecoder instead decodes the new tokens together with a
few tokens before them and emits the difference, holding tokens back while the text ends in an incomplete
character.
"""

from __future__ import annotations

from collections.abc import Sequence

from megalm.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 8  # tokens of already-emitted text decoded again as context
MAX_PENDING = 16  # a run of undecodable tokens this long is emitted as is (it was not a split character)


class IncrementalDecoder:
    """push(ids) -> the text those ids add; flush() -> whatever is still held back."""

    def __init__(self, tokenizer: Tokenizer, skip_ids: Sequence[int] = (), context: Sequence[int] = ()):
        self.tok, self.skip = tokenizer, set(skip_ids)
        self.context: list[int] = [int(i) for i in context][-CONTEXT_TOKENS:]  # the last emitted ids (or a prompt)
        self.pending: list[int] = []  # ids not yet emitted

    def push(self, ids: Sequence[int]) -> str:
        """Text of `ids` following what was emitted before (may be empty while a character is incomplete)."""
        self.pending += [int(i) for i in ids if int(i) not in self.skip]
        if not self.pending:
            return ""
        prefix = self.tok.decode(self.context)
        text = self.tok.decode(self.context + self.pending)
        if text.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING:
            return ""  # the last token may end inside a character: wait for the next one
        return self._emit(text[len(prefix) :] if text.startswith(prefix) else self.tok.decode(self.pending))

    def _emit(self, text: str) -> str:
        self.context = (self.context + self.pending)[-CONTEXT_TOKENS:]
        self.pending = []
        return text

    def flush(self) -> str:
        """The held-back ids' text, even if it ends in an incomplete character."""
        if not self.pending:
            return ""
        prefix = self.tok.decode(self.context)
        text = self.tok.decode(self.context + self.pending)
        return self._emit(text[len(prefix) :] if text.startswith(prefix) else self.tok.decode(self.pending))
