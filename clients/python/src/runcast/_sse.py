"""An incremental, bounded Server-Sent Events parser.

It follows the WHATWG "interpret an event stream" rules that matter for runcast's stream: lines
end at CRLF, LF or CR (also when a CRLF is split across reads); a blank line dispatches; `data`
lines are joined with LF (the gateway splits pretty-printed JSON over several `data:` lines);
`:` lines are comments (heartbeats); one leading space after the colon is removed; unknown
fields are ignored.

Unlike a browser's parser it refuses to buffer without bound: a line longer than `max_line`, or a
message whose data grows past `max_message`, raises `ProtocolError`. Invalid UTF-8 raises too,
since the gateway only ever sends JSON text and a replaced character would silently change data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from ._errors import ProtocolError

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Message:
    event: str
    data: str
    id: Optional[str]


class SSEParser:
    def __init__(self, max_line: int, max_message: int) -> None:
        self.max_line = max_line
        self.max_message = max_message
        self._buf = bytearray()
        self._skip_lf = False
        self._started = False
        self._data: List[str] = []
        self._data_len = 0
        self._event = ""
        self._id: Optional[str] = None
        self.retry_ms: Optional[int] = None

    def feed(self, chunk: bytes) -> List[Message]:
        if self._skip_lf and chunk:
            # The previous read ended in CR; an LF starting this one belongs to that line end.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._buf += chunk
        if not self._started:
            if len(self._buf) < 3 and _BOM.startswith(bytes(self._buf)):
                return []  # might still become a byte-order mark: wait for more
            self._started = True
            if self._buf[:3] == _BOM:
                del self._buf[:3]
        out: List[Message] = []
        pos = 0
        buf = self._buf
        while True:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            if m.group() == b"\r" and m.end() == len(buf):
                # A CR at the very end: it ends the line, and an LF at the start of the next read
                # must not count as a second (blank) line.
                self._skip_lf = True
            line = bytes(buf[pos:m.start()])
            pos = m.end()
            if len(line) > self.max_line:
                raise ProtocolError(f"SSE line over {self.max_line} bytes")
            msg = self._line(line)
            if msg is not None:
                out.append(msg)
        del buf[:pos]
        if len(buf) > self.max_line:
            raise ProtocolError(f"SSE line over {self.max_line} bytes")
        return out

    def _line(self, raw: bytes) -> Optional[Message]:
        if not raw:
            return self._dispatch()
        if raw[:1] == b":":
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"SSE line is not UTF-8: {e}") from None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_len += len(value) + 1
            if self._data_len > self.max_message:
                raise ProtocolError(f"SSE message over {self.max_message} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Optional[Message]:
        if not self._data:
            self._event = ""
            return None
        msg = Message(self._event or "message", "\n".join(self._data), self._id)
        self._data = []
        self._data_len = 0
        self._event = ""
        return msg
