"""Python client for runcast, the broadcast gateway for live job progress.

- `Publisher` / `AsyncPublisher`: publish a run's events over a gateway's HTTP API, with safe
  retries (idempotency keys).
- `NatsPublisher` (extra `runcast[nats]`): publish straight to NATS JetStream.
- `subscribe()`: follow a run exactly once across reconnects (SSE, standard library only; or
  WebSocket with the extra `runcast[ws]`).

No dependency is required for publishing over HTTP and subscribing over SSE.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._common import Backoff
from ._errors import (
    APIError,
    CapacityError,
    ClosedError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RuncastError,
    ServerError,
    TransportError,
    UnauthorizedError,
    UnavailableError,
)
from ._types import Event, Gap, Item, State
from .publisher import AsyncPublisher, NewEvent, Publisher
from .subscribe import Subscription, subscribe

if TYPE_CHECKING:
    from ._nats import NatsPublisher

__version__ = "0.1.0"

# A library logs, the application decides where it goes: without this, Python's last-resort
# handler would print the retry warnings to stderr of every program that never set up logging.
logging.getLogger("runcast").addHandler(logging.NullHandler())

__all__ = [
    "Publisher", "AsyncPublisher", "NatsPublisher", "NewEvent", "Backoff",
    "subscribe", "Subscription", "Event", "State", "Gap", "Item",
    "RuncastError", "APIError", "InvalidRequestError", "UnauthorizedError", "ForbiddenError",
    "NotFoundError", "ConflictError", "RateLimitedError", "ServerError", "UnavailableError",
    "CapacityError", "TransportError", "ProtocolError", "ClosedError",
]


def __getattr__(name: str) -> Any:
    # NatsPublisher is imported on first use so that `import runcast` works without nats-py.
    if name == "NatsPublisher":
        from ._nats import NatsPublisher
        return NatsPublisher
    raise AttributeError(f"module 'runcast' has no attribute {name!r}")
