"""Server-Sent Events, parsed as the WHATWG HTML Standard says (9.2.6 "Interpreting an event stream").

- The stream is UTF-8; a leading U+FEFF BOM is dropped once; invalid bytes become U+FFFD.
- Lines end at CRLF, LF or CR (a CR at the end of one chunk followed by an LF at the start of the
  next is one line end).
- Empty line: dispatch. Line starting with ':': comment. Otherwise field name up to the first ':',
  value after it with one leading space removed (no ':' means the whole line is the name, value "").
- Fields: `event` sets the event type buffer; `data` appends value + LF to the data buffer; `id`
  (unless the value contains U+0000) sets the last event ID buffer; `retry` with only ASCII digits
  sets the reconnection time; anything else is ignored.
- Dispatch: the last event ID string becomes the last event ID buffer (even when no event is fired);
  an empty data buffer fires nothing (buffers reset); otherwise one trailing LF is removed and a
  MessageEvent(type or "message", data, lastEventId) is fired. The data and type buffers are reset;
  the last event ID buffer is not.
- At end of stream, a pending event that was not terminated by a blank line is discarded.
"""

from __future__ import annotations

import codecs
import json
import socket
import time
from dataclasses import dataclass
from typing import List, Optional

import httpc


@dataclass
class SSEEvent:
    type: str
    data: str
    last_event_id: str

    def json(self):
        return json.loads(self.data)


@dataclass
class Comment:
    text: str


class SSEParser:
    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True
        self._skip_lf = False
        self._line = []  # pieces of the current (unterminated) line
        self.data_buffer = ""
        self.event_type = ""
        self.last_event_id_buffer = ""
        self.last_event_id = ""  # the EventSource's "last event ID string"
        self.retry: Optional[int] = None
        self.retry_fields: List[str] = []
        self.fields_seen: List[tuple] = []

    def feed(self, data: bytes) -> list:
        text = self._decoder.decode(data)
        if self._first and text:
            if text[0] == "\ufeff":
                text = text[1:]
            self._first = False
        out = []
        i, n = 0, len(text)
        while i < n:
            if self._skip_lf:
                self._skip_lf = False
                if text[i] == "\n":
                    i += 1
                    continue
            j = i
            while j < n and text[j] not in "\r\n":
                j += 1
            self._line.append(text[i:j])
            if j == n:
                break
            # line terminator at j
            line = "".join(self._line)
            self._line = []
            if text[j] == "\r":
                if j + 1 < n:
                    if text[j + 1] == "\n":
                        j += 1
                else:
                    self._skip_lf = True
            i = j + 1
            r = self._process_line(line)
            if r is not None:
                out.append(r)
        return out

    def _process_line(self, line: str):
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return Comment(line[1:])
        if ":" in line:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        self.fields_seen.append((name, value))
        if name == "event":
            self.event_type = value
        elif name == "data":
            self.data_buffer += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id_buffer = value
        elif name == "retry":
            self.retry_fields.append(value)
            if value and all(c in "0123456789" for c in value):
                self.retry = int(value)
        return None

    def _dispatch(self):
        self.last_event_id = self.last_event_id_buffer
        if self.data_buffer == "":
            self.event_type = ""
            return None
        data = self.data_buffer
        if data.endswith("\n"):
            data = data[:-1]
        ev = SSEEvent(self.event_type or "message", data, self.last_event_id)
        self.data_buffer = ""
        self.event_type = ""
        return ev


class SSEStream:
    """An open SSE response, parsed incrementally."""

    def __init__(self, resp: httpc.StreamResponse):
        self.resp = resp
        self.parser = SSEParser()
        self.pending: list = []
        self.comments: list = []  # (monotonic time, text)
        self.raw = b""
        self.ended = False

    @property
    def status(self):
        return self.resp.status

    def header(self, name):
        return self.resp.header(name)

    @property
    def last_event_id(self):
        return self.parser.last_event_id

    def _pump(self, deadline) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            chunk = self.resp.read_some(left)
        except (socket.timeout, TimeoutError):
            return False
        if not chunk:
            if self.resp.done:
                self.ended = True
            return False
        self.raw += chunk
        for item in self.parser.feed(chunk):
            if isinstance(item, Comment):
                self.comments.append((time.monotonic(), item.text))
            self.pending.append(item)
        return True

    def next_item(self, timeout: float = 5.0):
        """The next event or comment; None at end of stream. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.ended:
                return None
            if not self._pump(deadline):
                if self.ended:
                    return None
                if time.monotonic() >= deadline:
                    raise TimeoutError("no SSE message in time")
        return self.pending.pop(0)

    def next_event(self, timeout: float = 5.0) -> Optional[SSEEvent]:
        deadline = time.monotonic() + timeout
        while True:
            item = self.next_item(max(0.001, deadline - time.monotonic()))
            if item is None or isinstance(item, SSEEvent):
                return item

    def next_frame(self, timeout: float = 5.0):
        """The next event's data parsed as JSON (a protocol frame), with the event attached."""
        ev = self.next_event(timeout)
        if ev is None:
            return None
        f = json.loads(ev.data)
        return f

    def wait_end(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.next_item(max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if item is None:
                return True
        return False

    def close(self):
        self.resp.close()


def open_sse(base: str, path: str, headers=None, timeout: float = 10.0, ssl_context=None,
             rcvbuf=None) -> SSEStream:
    hdrs = {"Accept": "text/event-stream"}
    hdrs.update(headers or {})
    resp = httpc.open_stream(base, "GET", path, hdrs, None, timeout, ssl_context, rcvbuf=rcvbuf)
    if resp.status != 200:
        try:
            resp.read_all(timeout)
        except Exception:  # noqa: BLE001
            pass
        resp.close()
    return SSEStream(resp)
