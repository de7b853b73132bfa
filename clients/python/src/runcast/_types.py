"""What a subscription yields: `State`, then `Event`s and `Gap`s.

The classes are small frozen dataclasses built from the protocol's frames
(docs/protocol.md, "Server → client"). Building them checks every field a client relies on, so a
malformed frame becomes a `ProtocolError` instead of a half-filled object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from ._errors import ProtocolError, _short

__all__ = ["Event", "State", "Gap", "Item"]

FINISHED_STATUSES = ("completed", "failed")


def _int(frame: Dict[str, Any], key: str, what: str) -> int:
    v = frame.get(key)
    # bool is an int subclass in Python; a seq of `true` is malformed, not 1.
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError(f"{what} frame has no valid {key!r}: {_short(frame)}")
    return v


def _str(frame: Dict[str, Any], key: str, what: str) -> str:
    v = frame.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"{what} frame has no valid {key!r}: {_short(frame)}")
    return v


@dataclass(frozen=True)
class Event:
    """One published event. `data` is the publisher's JSON, decoded (key order kept)."""

    run: str
    seq: int
    kind: str
    data: Any
    ts: int
    traceparent: Optional[str] = None

    @classmethod
    def from_frame(cls, frame: Dict[str, Any]) -> "Event":
        if "data" not in frame:
            raise ProtocolError(f"event frame has no 'data': {_short(frame)}")
        tp = frame.get("traceparent")
        if tp is not None and not isinstance(tp, str):
            raise ProtocolError(f"event frame has a non-string traceparent: {_short(frame)}")
        return cls(run=_str(frame, "run", "event"), seq=_int(frame, "seq", "event"),
                   kind=_str(frame, "kind", "event"), data=frame["data"],
                   ts=_int(frame, "ts", "event"), traceparent=tp)


@dataclass(frozen=True)
class State:
    """The run's state when the subscription started.

    `state` is the RunState object (docs/protocol.md, "Run state") or None for a run with no
    events yet; `seq` is the last seq it includes (0 for a new run).
    """

    run: str
    seq: int
    state: Optional[Dict[str, Any]]

    @property
    def status(self) -> Optional[str]:
        """`running`, `completed`, `failed`, or None for a run with no events yet."""
        s = (self.state or {}).get("status")
        return s if isinstance(s, str) else None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def percent(self) -> Optional[float]:
        p = (self.state or {}).get("percent")
        return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None

    @classmethod
    def from_frame(cls, frame: Dict[str, Any]) -> "State":
        st = frame.get("state")
        if st is not None and not isinstance(st, dict):
            raise ProtocolError(f"state frame's 'state' is not an object: {_short(frame)}")
        return cls(run=_str(frame, "run", "state"), seq=_int(frame, "seq", "state"), state=st)


@dataclass(frozen=True)
class Gap:
    """Events `from_..=to` were dropped by retention before this client got them; they will never
    arrive. The subscription goes on at `to + 1`. (`from` is a Python keyword, hence `from_`.)"""

    run: str
    from_: int
    to: int
    message: str

    @classmethod
    def from_frame(cls, frame: Dict[str, Any]) -> "Gap":
        g = cls(run=_str(frame, "run", "gap"), from_=_int(frame, "from", "gap"),
                to=_int(frame, "to", "gap"), message=str(frame.get("message") or ""))
        if g.from_ > g.to:
            raise ProtocolError(f"gap frame with from > to: {_short(frame)}")
        return g


Item = Union[State, Event, Gap]
