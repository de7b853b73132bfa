"""Self-tests of the suite's SSE parser against the WHATWG event-stream algorithm (no server)."""

from sse import Comment, SSEEvent, SSEParser


def events(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out += [x for x in p.feed(c) if isinstance(x, SSEEvent)]
    return p, out


def test_line_endings_crlf_lf_cr_are_all_line_ends():
    for sep in (b"\r\n", b"\n", b"\r"):
        _, evs = events([b"data: a" + sep + b"data: b" + sep + sep])
        assert [(e.type, e.data) for e in evs] == [("message", "a\nb")], sep


def test_crlf_split_across_chunks_is_one_line_end():
    _, evs = events([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert [e.data for e in evs] == ["a\nb"]


def test_byte_by_byte_feeding_and_utf8_split():
    raw = "id: 7\ndata: {\"x\":\"é😀\"}\n\n".encode()
    _, evs = events([raw[i:i + 1] for i in range(len(raw))])
    assert [(e.data, e.last_event_id) for e in evs] == [('{"x":"é😀"}', "7")]


def test_bom_stripped_once_and_comments():
    p = SSEParser()
    items = p.feed(b"\xef\xbb\xbf: hi\n\ndata:x\n\n")
    assert isinstance(items[0], Comment) and items[0].text == " hi"
    assert [i.data for i in items if isinstance(i, SSEEvent)] == ["x"]


def test_field_without_colon_and_space_handling():
    _, evs = events([b"data\ndata:  two\n\n"])
    assert evs[0].data == "\n two"


def test_id_persists_and_null_id_ignored_and_empty_id_resets():
    p, evs = events([b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x00\ndata: c\n\nid\ndata: d\n\n"])
    assert [(e.data, e.last_event_id) for e in evs] == [("a", "1"), ("b", "1"), ("c", "1"), ("d", "")]


def test_id_without_data_updates_last_event_id_on_dispatch_only():
    p = SSEParser()
    p.feed(b"id: 5\n")
    assert p.last_event_id == ""  # not dispatched yet
    p.feed(b"\n")
    assert p.last_event_id == "5"


def test_retry_digits_only():
    p, _ = events([b"retry: 2000\n\nretry: 12a\n\nretry: 3000 \n\n"])
    assert p.retry == 2000


def test_event_type_and_unterminated_event_discarded():
    p, evs = events([b"event: x\ndata: 1\n\ndata: pending"])
    assert [(e.type, e.data) for e in evs] == [("x", "1")]


def test_trailing_lf_removed_once():
    _, evs = events([b"data: a\ndata:\n\n"])
    assert evs[0].data == "a\n"
