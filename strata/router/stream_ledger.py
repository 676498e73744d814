"""What a client has had of a streamed completion, as token ids and text, and where another
endpoint can take it over.

The server sends a chunk's token ids with the first of their text, but while a stop string
could still match it holds back the text's last `hold` characters (the longest stop string
but one): the ids arrive with or before their text, never after. So after every chunk that
carries text, the output's ids so far make exactly the text sent so far plus `hold`
characters. Such a point is a resume point once the client has all of that text. A
continuation from one regenerates the tokens after it; their text the client already has
is checked against what comes back and skipped, the rest is new. Without stop strings
(hold 0) the last chunk with text is a resume point and nothing is regenerated."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


class Diverged(Exception):
    """A continuation's regenerated tokens disagree with what the client already has."""


class ResumePoint(NamedTuple):  # one per chunk: a tuple is the cheapest to make
    num_ids: int  # the output's first num_ids token ids...
    text_end: int  # ...make its first text_end characters


@dataclass
class StreamLedger:
    hold: int
    wants_ids: bool  # the client gets the ids too: regenerated ones must equal them
    prompt_ids: list[int] | None = None  # from the stream's first chunk
    ids: list[int] = field(default_factory=list)  # the output's, sent or text held back
    text: list[str] = field(default_factory=list)  # what the client has, in pieces
    num_chars: int = 0
    finished: bool = False
    # The resume points not yet passed by a later one, the first being the latest reached.
    points: deque[ResumePoint] = field(default_factory=lambda: deque([ResumePoint(0, 0)]))
    start: ResumePoint = ResumePoint(0, 0)  # where the endpoint answering now started
    upstream_ids: int = 0  # ids it has sent
    upstream_chars: int = 0  # characters it has sent, skipped ones included

    def accept(self, ids: list[int], text: str, finished: bool) -> tuple[list[int], str]:
        """One chunk of the endpoint answering now: the ids and text the client has not had.
        Raises Diverged where it contradicts what the client has."""
        at_id = self.start.num_ids + self.upstream_ids
        at_char = self.start.text_end + self.upstream_chars
        new_ids, piece = ids, text
        if at_id < len(self.ids) or at_char < self.num_chars:  # regenerated: the client's
            new_ids, piece = self._regenerated(ids, text, at_id, at_char)
        self.ids.extend(new_ids)
        self.upstream_ids += len(ids)
        self.upstream_chars += len(text)
        if piece:
            self.text.append(piece)
            self.num_chars += len(piece)
        if finished:
            if at_char + len(text) < self.num_chars or at_id + len(ids) < len(self.ids):
                raise Diverged("the continuation ended inside what was already sent")
            self.finished = True
        elif text:
            self.points.append(ResumePoint(at_id + len(ids), at_char + len(text) + self.hold))
        while len(self.points) > 1 and self.points[1].text_end <= self.num_chars:
            self.points.popleft()
        return new_ids, piece

    def _regenerated(self, ids: list[int], text: str, at_id: int, at_char: int
                     ) -> tuple[list[int], str]:
        """What is new in a chunk that regenerates tokens the client has, once checked."""
        known = self.ids[at_id:at_id + len(ids)]  # regenerated ids the client was sent
        if ids[:len(known)] != known:
            raise Diverged(f"regenerated token ids {ids[:len(known)]} differ from the "
                           f"{known} already sent")
        had = min(self.num_chars - at_char, len(text))  # regenerated text it has
        if had > 0 and text[:had] != "".join(self.text)[at_char:at_char + had]:
            raise Diverged(f"regenerated text {text[:had]!r} differs from what was sent")
        return ids[len(known):], text[max(0, had):]

    def resume(self) -> ResumePoint:
        """The latest point whose text the client has in full: the next endpoint starts
        there. Ids after it that the client never saw are dropped (they will be drawn
        again); those it saw stay, to be checked."""
        self.start = self.points[0]
        self.points = deque([self.start])
        self.upstream_ids = self.upstream_chars = 0
        if not self.wants_ids:
            del self.ids[self.start.num_ids:]
        return self.start
