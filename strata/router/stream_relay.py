"""The SSE events of a resumable stream on their way to the client: each is read into the
ledger, the token ids the proxy asked for are taken out again unless the client asked too,
and a continuation's /v1/completions chunks are rewritten into the stream's own shape (its
id, created and model; a chat's delta.content; usage counted from the original prompt).

Only events of resumable streams come here, one orjson parse each; other answers pass
through the proxy as bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from strata.router.failover import ResumableRequest
from strata.router.stream_ledger import Diverged, StreamLedger

DATA = b"data: "
DONE = b"data: [DONE]"
HEADER_FIELDS = ("id", "object", "created", "model")


class UpstreamError(Exception):
    """The endpoint ended the stream with a 5xx error event (its engine died)."""


@dataclass
class StreamRelay:
    request: ResumableRequest
    ledger: StreamLedger
    header: dict = field(default_factory=dict)  # the stream's id, object, created, model
    continuing: bool = False  # the events come from a continuation
    trackable: bool = True  # every chunk had its token ids (an endpoint may not send them)
    usage_sent: bool = False
    done_sent: bool = False

    @classmethod
    def of(cls, request: ResumableRequest) -> StreamRelay:
        return cls(request, StreamLedger(request.hold, request.wants_ids))

    def relay(self, events: bytes) -> tuple[bytes, Exception | None]:
        """Whole SSE events from the endpoint, as the client gets them, up to the first that
        ends this endpoint's part (an UpstreamError or Diverged, returned beside them)."""
        out = []
        for event in events.split(b"\n\n")[:-1]:
            try:
                out.append(self._event(event))
            except (UpstreamError, Diverged) as failure:
                return b"".join(out), failure
        return b"".join(out), None

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(DATA + b"{"):
            self.done_sent |= event == DONE
            return event + b"\n\n"
        try:
            payload = orjson.loads(event[len(DATA):])
        except orjson.JSONDecodeError:
            return event + b"\n\n"  # not ours to read: it passes as it came
        if (error := payload.get("error")) is not None:
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, int) and code < 500:
                return event + b"\n\n"  # the request's own fault: no other endpoint helps
            raise UpstreamError(f"an error event: {error}")
        if self.continuing:
            return self._continued(payload)
        if not self.header:
            self.header = {k: payload[k] for k in HEADER_FIELDS if k in payload}
        self._track(payload)
        if self.request.wants_ids or not _strip_ids(payload):
            return event + b"\n\n"
        return _sse(payload)

    def _track(self, payload: dict) -> None:
        """Reads the original endpoint's chunk into the ledger."""
        self.usage_sent = self.usage_sent or "usage" in payload
        choices = payload.get("choices")
        if not choices or not self.trackable:
            return
        choice = choices[0]
        prompt_ids = payload.get("prompt_token_ids", choice.get("prompt_token_ids"))
        if prompt_ids is not None:
            self.ledger.prompt_ids = prompt_ids
        text = (choice.get("delta") or {}).get("content") if self.request.chat \
            else choice.get("text")
        ids = choice.get("token_ids")
        if ids is None and (text or choice.get("finish_reason")):
            self.trackable = False  # the endpoint does not send ids: nothing to resume from
            return
        if ids is not None or text:
            self.ledger.accept(ids, text or "", choice.get("finish_reason") is not None)

    def _continued(self, payload: dict) -> bytes:
        """A continuation's chunk in the stream's shape, or nothing when all of it was the
        client's already."""
        if "usage" in payload:
            self.usage_sent = True
            return _sse(self.header | {"choices": [], "usage": self._usage(payload["usage"])})
        if not payload.get("choices"):
            return b""
        choice = payload["choices"][0]
        finish = choice.get("finish_reason")
        ids, text = self.ledger.accept(choice.get("token_ids") or [], choice.get("text") or "",
                                       finish is not None)
        if not text and finish is None and not (ids and self.request.wants_ids):
            return b""
        out: dict = {"index": 0}
        if self.request.chat:
            out["delta"] = {"content": text} if text else {}
        else:
            out["text"] = text
        out |= {"logprobs": None, "finish_reason": finish,
                "stop_reason": choice.get("stop_reason")}
        if self.request.wants_ids:
            out["token_ids"] = ids
        return _sse(self.header | {"choices": [out]})

    def _usage(self, usage: dict) -> dict:
        """A continuation's usage as the whole answer's: the original prompt, and every
        token of the output (those in the continuation's prompt, and its own)."""
        prompt = len(self.ledger.prompt_ids or ())
        completion = self.ledger.start.num_ids + usage.get("completion_tokens", 0)
        total = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and "cached_tokens" in details:
            total["prompt_tokens_details"] = details | {
                "cached_tokens": min(details["cached_tokens"], prompt)}
        return usage | total

    @property
    def resumable(self) -> bool:
        return self.trackable and self.ledger.prompt_ids is not None

    def continue_from_here(self) -> bytes:
        """The body of a continuation from the ledger's resume point; later events are
        read as that continuation's."""
        start = self.ledger.resume()
        self.continuing = True
        return self.request.continuation_body(self.ledger.prompt_ids, self.ledger.ids, start)

    def ending(self) -> bytes:
        """The rest of a stream whose last token the client has: usage, if it wants it and
        has not had it, then [DONE], if not sent yet."""
        if self.done_sent:
            return b""
        usage = b""
        if self.request.include_usage and not self.usage_sent:
            prompt, completion = len(self.ledger.prompt_ids), len(self.ledger.ids)
            usage = _sse(self.header | {"choices": [], "usage": {
                "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}})
        return usage + DONE + b"\n\n"


def _strip_ids(payload: dict) -> bool:
    """Takes the token ids out of a chunk; whether it had any."""
    found = payload.pop("prompt_token_ids", None) is not None  # chat's, beside the choices
    for choice in payload.get("choices") or ():
        found |= choice.pop("prompt_token_ids", None) is not None
        found |= choice.pop("token_ids", None) is not None
    return found


def _sse(payload: dict) -> bytes:
    return DATA + orjson.dumps(payload) + b"\n\n"
