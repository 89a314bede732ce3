"""message.py: stdin → CRLF message bytes (sendmail's dot and -i rules) and the header policy."""

import email
import email.policy
import email.utils
from email.header import decode_header, make_header
import io
import os
import re
import threading

import pytest
from hypothesis import given, settings, strategies as st

from sendmail_shim.errors import DataError, PolicyError, ShimError, UsageError
from sendmail_shim.message import (
    HeaderPolicy,
    complete_envelope,
    parse_recipient_args,
    prepare,
    resolve_local,
)
from sendmail_shim.reader import BodyInfo, HeaderField, MessageReader, split_fields

LOGIN = "alice@163.com"
ALIASES = {"root": "admin@example.com", "www-data": "web@example.com"}
POLICY = HeaderPolicy(sender=LOGIN, aliases=ALIASES, local_hostname="web1.example.com")
NOW = 1_700_000_000.0


def read(data: bytes, *, dot_ends: bool = False, chunk_size: int = 65536) -> tuple[bytes, bytes]:
    reader = MessageReader(io.BytesIO(data), dot_ends=dot_ends, chunk_size=chunk_size)
    header = reader.read_header_block()
    body = io.BytesIO()
    info = reader.copy_body(body)
    assert info.size == len(body.getvalue())
    return header, body.getvalue()


def cases(argnames: str, rows: list[tuple]):
    """Parametrize from table rows whose first item is the test id."""
    return pytest.mark.parametrize(argnames, [pytest.param(*row[1:], id=row[0]) for row in rows])


def whole(data: bytes, **kwargs) -> bytes:
    return b"".join(read(data, **kwargs))


def assert_crlf_only(data: bytes) -> None:
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", data), data
    assert b"\r\r\n" not in data


# ---------------------------------------------------------------------------------------------
# Reading: line ends, dots, mbox From_, header/body split

READ_CASES = [
    ("lf", b"A: 1\nB: 2\n\nbody\n", False, b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
    ("crlf", b"A: 1\r\nB: 2\r\n\r\nbody\r\n", False, b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
    ("mixed_php8", b"A: 1\r\nB: 2\n\r\nbody\nmore\r\n", False, b"A: 1\r\nB: 2\r\n\r\nbody\r\nmore\r\n"),
    ("bare_cr_in_body", b"A: 1\n\nbody\rmore\r", False, b"A: 1\r\n\r\nbody\r\nmore\r\n"),
    # a lone CR never ends a header line (test_lone_cr_in_the_header_block_is_refused)
    ("cr_cr_lf_one_end_in_header_two_in_body", b"A: 1\r\r\n\r\r\nbody\r\r\n", False,
     b"A: 1\r\n\r\nbody\r\n\r\n"),
    ("crs_at_the_end_of_the_input", b"A: 1\r\r\r", False, b"A: 1\r\n\r\n\r\n"),
    ("lone_cr_starts_the_body", b"A: 1\nhello\rB: 2\n", False, b"A: 1\r\nhello\r\nB: 2\r\n"),
    ("lf_cr_is_two_ends", b"A: 1\n\rbody", False, b"A: 1\r\n\r\nbody\r\n"),
    ("no_final_newline", b"A: 1\n\nlast line", False, b"A: 1\r\n\r\nlast line\r\n"),
    ("empty_input", b"", False, b""),
    ("lone_dot_is_data_with_i", b"A: 1\n\none\n.\ntwo\n", False, b"A: 1\r\n\r\none\r\n.\r\ntwo\r\n"),
    ("lone_dot_ends", b"A: 1\n\none\n.\ntwo\n", True, b"A: 1\r\n\r\none\r\n"),
    ("lone_dot_crlf_ends", b"A: 1\r\n\r\none\r\n.\r\ntwo\r\n", True, b"A: 1\r\n\r\none\r\n"),
    ("final_dot_without_newline_ends", b"A: 1\n\none\n.", True, b"A: 1\r\n\r\none\r\n"),
    ("dot_in_headers_ends", b"A: 1\n.\nB: 2\n", True, b"A: 1\r\n"),
    ("dot_first_line_ends", b".\nA: 1\n", True, b""),
    ("unstuff_with_dot_ends", b"A: 1\n\n..\n..x\n...y\n", True, b"A: 1\r\n\r\n.\r\n.x\r\n..y\r\n"),
    ("single_leading_dot_kept", b"A: 1\n\n.x\n. \n", True, b"A: 1\r\n\r\n.x\r\n. \r\n"),
    ("no_unstuff_with_i", b"A: 1\n\n..\n..x\n", False, b"A: 1\r\n\r\n..\r\n..x\r\n"),
    ("dot_mid_line_is_data", b"A: 1\n\na.\n x.\n", True, b"A: 1\r\n\r\na.\r\n x.\r\n"),
    # SMTP smuggling shapes: with -i they are content, every piece a proper CRLF line
    ("smuggle_lf_dot_lf", b"A: 1\n\nx\n.\nMAIL FROM:<boss@x>\n", False,
     b"A: 1\r\n\r\nx\r\n.\r\nMAIL FROM:<boss@x>\r\n"),
    ("smuggle_cr_dot_cr", b"A: 1\n\nx\r.\rMAIL FROM:<boss@x>\n", False,
     b"A: 1\r\n\r\nx\r\n.\r\nMAIL FROM:<boss@x>\r\n"),
    ("smuggle_crlf_dot_lf", b"A: 1\n\nx\r\n.\nMAIL FROM:<boss@x>\n", False,
     b"A: 1\r\n\r\nx\r\n.\r\nMAIL FROM:<boss@x>\r\n"),
    ("smuggle_lf_dot_crlf", b"A: 1\n\nx\n.\r\nMAIL FROM:<boss@x>\n", False,
     b"A: 1\r\n\r\nx\r\n.\r\nMAIL FROM:<boss@x>\r\n"),
    # without -i a bare CR is a line end too, so "\r.\r" is a lone dot: it ends the input
    ("smuggle_cr_dot_cr_dot_ends", b"A: 1\n\nx\r.\rMAIL FROM:<boss@x>\n", True, b"A: 1\r\n\r\nx\r\n"),
    ("mbox_from_removed", b"From alice@x Mon Jan  1 00:00:00 2024\nA: 1\n\nFrom here\n", False,
     b"A: 1\r\n\r\nFrom here\r\n"),
    ("from_header_kept", b"From: a@x\n\nbody\n", False, b"From: a@x\r\n\r\nbody\r\n"),
    ("utf8_8bit_intact", "Subject: 中文\n\n正文 \xff\n".encode() + b"\xff\xfe\n", False,
     "Subject: 中文\r\n\r\n正文 \xff\r\n".encode() + b"\xff\xfe\r\n"),
]


@cases("data, dot_ends, expected", READ_CASES)
def test_read_normalises(data, dot_ends, expected):
    out = whole(data, dot_ends=dot_ends)
    assert out == expected
    assert_crlf_only(out)


@cases("data, dot_ends, expected", READ_CASES)
def test_every_chunk_boundary_gives_the_same_bytes(data, dot_ends, expected):
    for chunk_size in range(1, len(data) + 2):
        assert whole(data, dot_ends=dot_ends, chunk_size=chunk_size) == expected, chunk_size


SPLIT_CASES = [
    ("headers_and_body", b"A: 1\n B\n\tC\nB: 2\n\nbody\n", b"A: 1\r\n B\r\n\tC\r\nB: 2\r\n\r\n", b"body\r\n"),
    ("no_headers", b"hi\nthere\n", b"", b"hi\r\nthere\r\n"),
    ("first_line_indented", b" A: 1\n\nx\n", b"", b" A: 1\r\n\r\nx\r\n"),
    ("first_line_name_with_space", b"Dear Sir: hello\n\nx\n", b"", b"Dear Sir: hello\r\n\r\nx\r\n"),
    ("only_headers_no_separator", b"Subject: x\nTo: a@b", b"Subject: x\r\nTo: a@b\r\n", b""),
    ("body_line_ends_headers", b"Subject: x\nhello\n\nmore\n", b"Subject: x\r\n", b"hello\r\n\r\nmore\r\n"),
    ("separator_first", b"\nbody\n", b"\r\n", b"body\r\n"),
    ("obsolete_space_before_colon", b"Subject : x\n\nb\n", b"Subject : x\r\n\r\n", b"b\r\n"),
    ("mbox_then_no_headers", b"From x@y Mon\nhi\n", b"", b"hi\r\n"),
    ("mbox_only", b"From x@y Mon\n", b"", b""),
    ("mbox_not_first_line_kept", b"A: 1\nFrom x@y Mon\n", b"A: 1\r\n", b"From x@y Mon\r\n"),
    ("cr_cr_lf_php", b"A: 1\r\r\nB: 2\r\r\n\r\r\nbody\r\r\n", b"A: 1\r\nB: 2\r\n\r\n", b"body\r\n\r\n"),
    ("lf_cr_ends_the_header", b"A: 1\n\rbody\n", b"A: 1\r\n\r\n", b"body\r\n"),
    ("lone_cr_in_the_first_body_line", b"A: 1\nhello\rB: 2\n", b"A: 1\r\n", b"hello\r\nB: 2\r\n"),
    ("long_body_line_without_lf", b"A: 1\n" + b"x" * 5000, b"A: 1\r\n",
     b"x" * 998 + (b"\r\n " + b"x" * 997) * 4 + b"\r\n " + b"x" * 14 + b"\r\n"),
]


@cases("data, header, body", SPLIT_CASES)
def test_header_block_split(data, header, body):
    for chunk_size in (1, 2, 3, 7, 65536):
        assert read(data, chunk_size=chunk_size) == (header, body)


# ---------------------------------------------------------------------------------------------
# Long lines (Postfix smtp_line_length_limit), NUL, header cap, body info, drain

def test_line_of_998_is_kept_and_999_is_broken_postfix_style():
    assert whole(b"a" * 998) == b"a" * 998 + b"\r\n"
    assert whole(b"a" * 999 + b"\n") == b"a" * 998 + b"\r\n a\r\n"


@pytest.mark.parametrize("chunk_size", [7, 997, 998, 999, 1000, 65536])
def test_long_lines_are_broken_into_continuations(chunk_size):
    line = bytes(range(33, 127)) * 40  # 3760 octets
    out = whole(b"Subject: " + line + b"\n\n" + line + b"\nend", chunk_size=chunk_size)
    assert_crlf_only(out)
    assert max(len(x) for x in out.split(b"\r\n")) == 998
    header, _, body = out.partition(b"\r\n\r\n")
    # folded before its only white space, then, with nothing left to fold at, broken Postfix-style
    assert header.split(b"\r\n") == [b"Subject:", b" " + line[:997], b" " + line[997:1994],
                                     b" " + line[1994:2991], b" " + line[2991:]]
    assert body.replace(b"\r\n ", b"") == line + b"\r\nend\r\n"
    assert [len(x) for x in body.split(b"\r\n")] == [998, 998, 998, 769, 3, 0]


@pytest.mark.parametrize("chunk_size", [3, 7, 65536])
def test_long_stuffed_line_is_unstuffed_before_breaking(chunk_size):
    out = whole(b"A: 1\n\n.." + b"x" * 998 + b"\n", dot_ends=True, chunk_size=chunk_size)
    assert out == b"A: 1\r\n\r\n." + b"x" * 997 + b"\r\n x\r\n"


NUL_CASES = [
    ("in_header", b"A: 1\0\n\nbody\n"),
    ("in_body", b"A: 1\n\nbo\0dy\n"),
    ("last_line_no_newline", b"A: 1\n\nbody\0"),
    ("in_long_line", b"A: 1\n\n" + b"x" * 3000 + b"\0"),
    ("no_headers", b"\0"),
]


@cases("data", NUL_CASES)
@pytest.mark.parametrize("chunk_size", [7, 65536])
def test_nul_byte_is_refused(data, chunk_size):
    with pytest.raises(DataError, match="^message contains a NUL byte$") as info:
        read(data, chunk_size=chunk_size)
    assert info.value.exit_code == 65


LONE_CR_IN_HEADER = [
    ("subject_then_bcc", b"Subject: x\rBcc: victim@x.test\nTo: a@x.test\n\nbody\n"),
    ("crlf_message", b"To: a@x.test\r\nSubject: x\rBcc: victim@x.test\r\n\r\nbody\r\n"),
    ("continuation_line", b"Subject: x\n y\rBcc: victim@x.test\n\n"),
    ("cr_cr_then_text", b"Subject: x\r\rBcc: victim@x.test\n\n"),
    ("past_998_octets", b"Subject: " + b"x" * 1500 + b"\rBcc: victim@x.test\n\n"),
    ("last_line_without_newline", b"To: a@x.test\nSubject: x\rBcc: victim@x.test"),
    ("mbox_from_line", b"From x@y Mon\rTo: victim@x.test\nSubject: s\n\n"),
    ("old_mac_line_ends", b"To: a@x.test\rSubject: s\r\rbody\r"),
]


@cases("data", LONE_CR_IN_HEADER)
@pytest.mark.parametrize("dot_ends", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 65536])
def test_lone_cr_in_the_header_block_is_refused(data, dot_ends, chunk_size):
    with pytest.raises(DataError) as info:
        read(data, dot_ends=dot_ends, chunk_size=chunk_size)
    assert str(info.value) == "a header line contains a carriage return (CR) without a line feed (LF)"
    assert info.value.exit_code == 65


@pytest.mark.parametrize("chunk_size", [1, 7, 65536])
def test_a_header_line_may_end_in_several_crs(chunk_size):
    header, body = read(b"To: a@x.test\r\r\nSubject: s\r\r\r\n\r\r\nbody\r\r\n", chunk_size=chunk_size)
    assert header == b"To: a@x.test\r\nSubject: s\r\n\r\n"
    assert split_fields(header) == [HeaderField("to", b"To: a@x.test\r\n"), HeaderField("subject", b"Subject: s\r\n")]
    assert body == b"body\r\n\r\n"  # in the body every CR still ends a line


def test_header_line_of_crs_only_beyond_the_cap_is_refused():
    with pytest.raises(DataError, match="header block larger than 1 MiB"):
        read(b"To: a@x.test\n" + b"\r" * (1 << 20) + b"\nbody\n")


def test_nul_after_the_terminating_dot_is_not_part_of_the_message():
    assert whole(b"A: 1\n\nx\n.\n\0\n", dot_ends=True) == b"A: 1\r\n\r\nx\r\n"


def test_header_block_over_1_mib_is_refused_but_a_big_body_is_fine():
    field = b"X-Filler: " + b"f" * 70 + b"\n"
    with pytest.raises(DataError, match="header block larger than 1 MiB"):
        read(field * (1100 * 1024 // len(field)) + b"\nbody\n")
    body = b"y" * 76 + b"\n"
    header, out = read(b"A: 1\n\n" + body * 30_000)
    assert header == b"A: 1\r\n\r\n" and len(out) == 78 * 30_000


def test_copy_body_reports_size_and_eight_bit():
    reader = MessageReader(io.BytesIO(b"A: 1\n\nplain\n"), dot_ends=False)
    reader.read_header_block()
    assert reader.copy_body(io.BytesIO()) == BodyInfo(size=7, eight_bit=False)
    reader = MessageReader(io.BytesIO("A: 1\n\n中\n".encode()), dot_ends=False, chunk_size=2)
    reader.read_header_block()
    assert reader.copy_body(io.BytesIO()) == BodyInfo(size=5, eight_bit=True)


class Sink(io.RawIOBase):
    """Records how much of `source` had been read at each write: proves the body is streamed."""

    def __init__(self, source: io.BytesIO):
        self.source, self.read_at_write, self.size = source, [], 0

    def write(self, data):
        self.read_at_write.append(self.source.tell())
        self.size += len(data)
        return len(data)


@pytest.mark.parametrize("body", [(b"y" * 76 + b"\n") * 10_000, b"z" * 1_000_000],
                         ids=["short_lines", "one_huge_line"])
def test_body_is_streamed_in_chunks(body):
    source = io.BytesIO(b"A: 1\n\n" + body)
    reader = MessageReader(source, dot_ends=False, chunk_size=4096)
    reader.read_header_block()
    sink = Sink(source)
    reader.copy_body(sink)
    assert sink.read_at_write[0] <= 2 * 4096 and len(sink.read_at_write) > 100
    assert sink.size == len(whole(body))


def test_drain_reads_everything_after_an_error():
    stream = io.BytesIO(b"A: 1\n\n\0" + b"z" * 200_000)
    reader = MessageReader(stream, dot_ends=False, chunk_size=1024)
    with pytest.raises(DataError):
        reader.read_header_block()
        reader.copy_body(io.BytesIO())
    reader.drain()
    assert stream.read() == b""


def test_piped_writer_finishes_even_when_a_dot_ends_the_message():
    """Everything after the dot is read, so the writer sees no EPIPE and nothing acts before EOF."""
    read_fd, write_fd = os.pipe()
    problems = []

    def writer():
        try:
            with open(write_fd, "wb") as pipe:
                pipe.write(b"Subject: x\n\nbody\n.\n" + b"trailing\n" * 100_000)
        except OSError as exc:
            problems.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    with open(read_fd, "rb") as stdin:
        reader = MessageReader(stdin, dot_ends=True, chunk_size=4096)
        header = reader.read_header_block()
        body = io.BytesIO()
        reader.copy_body(body)
    thread.join()
    assert (header, body.getvalue(), problems) == (b"Subject: x\r\n\r\n", b"body\r\n", [])


# ---------------------------------------------------------------------------------------------
# Property: the reader is a model of "split at any line end, apply dot rules, break long lines"

_HEADER_RULE_LINE = re.compile(rb"([^\n]*?)(?:\r*\n|\r(?=\r*\Z)|\Z)")
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def broken(line: bytes) -> list[bytes]:
    pieces = []
    while len(line) > 998:
        pieces.append(line[:998])
        line = b" " + line[998:]
    return pieces + [line]


def folded(line: bytes) -> list[bytes]:
    """Reference for a header line: folded before the last white space run within 998 octets
    that has text before it on the line and text after it; else broken Postfix-style (not
    leaving the trailing white space alone on a line, when there is text before it)."""
    pieces, lead = [], b""
    while len(lead) + len(line) > 998:
        room = 998 - len(lead)
        end = len(line.rstrip(b" \t"))
        starts = [i for i in range(1, min(room, end - 1) + 1) if line[i] in b" \t" and line[i - 1] not in b" \t"]
        if starts:
            cut, after = starts[-1], b""
        else:
            cut, after = (room if end - 1 <= 0 else min(room, end - 1)), b" "
        pieces.append(lead + line[:cut])
        line, lead = line[cut:], after
    return pieces + [lead + line]


def model(data: bytes, dot_ends: bool) -> bytes | None:
    """Reference: the header block line by line under its rules (a line ends at LF, with any CRs
    before it, or at a CR of those ending the input; a CR elsewhere is refused), then the body
    split at every line end; dot rules; long header lines folded, long body lines broken. None means
    DataError (a NUL, or a lone CR in the header block)."""
    unstuff = (lambda line: line[1:] if line.startswith(b"..") else line) if dot_ends else (lambda line: line)
    header, pos, first = [], 0, True
    while pos < len(data):
        match = _HEADER_RULE_LINE.match(data, pos)
        text = match[1]
        if dot_ends and text == b".":
            return b"".join(line + b"\r\n" for line in header)
        text = unstuff(text)
        if first and text.startswith(b"From "):
            if b"\r" in text or b"\0" in text:
                return None
            first, pos = False, match.end()
            continue
        first = False
        if not text:
            header.append(b"")
            pos = match.end()
            break
        if not (_FIELD.match(text[:998]) or (header and text[:1] in b" \t")):
            if text[:1] == b"\r":
                header.append(b"")
                pos += 1
            break
        if b"\r" in text or b"\0" in text:
            return None
        header += folded(text)
        pos = match.end()
    lines = re.split(rb"\r\n|\r|\n", data[pos:])
    if lines[-1] == b"":
        lines.pop()
    kept = []
    for line in lines:
        if dot_ends and line == b".":
            break
        kept.append(unstuff(line))
    if any(b"\0" in line for line in kept):
        return None
    return b"".join(line + b"\r\n" for line in header + [piece for line in kept for piece in broken(line)])


FRAGMENTS = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b".", b"..", b"From ", b"Subject: x", b" ", b"\t", b"a", b"\xff",
     b"\0", b":", b"x" * 500, "中".encode()]
)
MESSY = st.one_of(st.binary(max_size=300), st.lists(FRAGMENTS, max_size=40).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(data=MESSY, dot_ends=st.booleans(), chunk_size=st.one_of(st.integers(1, 20), st.just(65536)))
def test_reader_property(data, dot_ends, chunk_size):
    expected = model(data, dot_ends)
    try:
        header, body = read(data, dot_ends=dot_ends, chunk_size=chunk_size)
    except DataError as exc:
        assert expected is None, exc
        return
    out = header + body
    assert out == expected
    assert_crlf_only(out)
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert header == b"" or header.endswith(b"\r\n")


# ---------------------------------------------------------------------------------------------
# Header policy

def prep(text: bytes, *, t: bool = True, argv=(), policy=POLICY, requested=None):
    """Header text (LF is fine: it goes through the reader) → (new header block, envelope)."""
    block = MessageReader(io.BytesIO(text), dot_ends=False).read_header_block()
    return prepare(block, extract_recipients=t, argv_recipients=list(argv),
                   requested_sender=requested, policy=policy, now=NOW)


def fields_named(block: bytes, name: bytes) -> list[bytes]:
    return [line for line in block.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]


def parsed(block: bytes):
    return email.message_from_bytes(block, policy=email.policy.default)


RECIPIENT_CASES = [
    ("to_cc_bcc", b"To: a@x.test\nCc: b@x.test\nBcc: c@x.test\n\n", [], ["a@x.test", "b@x.test", "c@x.test"]),
    ("several_to_lines_logwatch", b"To: a@x.test\nTo: b@x.test\nFrom: root\n\n", [], ["a@x.test", "b@x.test"]),
    ("folded_to", b"To: a@x.test,\n  b@x.test\n\n", [], ["a@x.test", "b@x.test"]),
    ("group", b"To: Team: a@x.test, b@x.test;\n\n", [], ["a@x.test", "b@x.test"]),
    ("undisclosed_plus_argv", b"To: undisclosed-recipients:;\n\n", ["z@x.test"], ["z@x.test"]),
    ("display_names", b'To: "Zhang, San" <z@x.test>, =?utf-8?b?5byg5LiJ?= <y@x.test>\n\n', [],
     ["z@x.test", "y@x.test"]),
    ("raw_utf8_display_name", "To: 张三 <z@x.test>\n\n".encode(), [], ["z@x.test"]),
    ("raw_gbk_display_name", b"To: \xd5\xc5\xc8\xfd <z@x.test>\n\n", [], ["z@x.test"]),
    ("obsolete_phrase_and_comment", b"To: John Q. Public <j@x.test>, k@x.test (Kay)\n\n", [],
     ["j@x.test", "k@x.test"]),
    ("dedupe_keeps_first_spelling", b"To: Bob@X.test, bob@x.test\nCc: BOB@x.TEST\n\n", ["bob@X.Test"],
     ["bob@X.Test"]),
    ("argv_first_then_headers", b"To: a@x.test\n\n", ["b@x.test"], ["b@x.test", "a@x.test"]),
    ("cron_mailto_comma_list", b"Subject: s\n\n", ["ops@x.test,second@x.test"], ["ops@x.test", "second@x.test"]),
    ("argv_name_addr", b"Subject: s\n\n", ["Ops Team <ops@x.test>", "a@x.test, b@x.test"],
     ["ops@x.test", "a@x.test", "b@x.test"]),
    ("resent_replaces_to_cc_bcc", b"To: old@x.test\nCc: old2@x.test\nResent-To: r1@x.test\n"
     b"Resent-Cc: r2@x.test\nResent-Bcc: r3@x.test\n\n", [], ["r1@x.test", "r2@x.test", "r3@x.test"]),
    ("resent_date_alone_disables_to", b"To: old@x.test\nResent-Date: Mon, 1 Jan 2024 00:00:00 +0000\n\n",
     ["n@x.test"], ["n@x.test"]),
    ("resent_any_case", b"To: old@x.test\nRESENT-to: r@x.test\n\n", [], ["r@x.test"]),
    ("alias_bare_name", b"To: root\n\n", [], ["admin@example.com"]),
    ("alias_this_host", b"To: root@web1.example.com\n\n", [], ["admin@example.com"]),
    ("alias_localhost_any_case", b"To: ROOT@LocalHost\n\n", [], ["admin@example.com"]),
    ("alias_argv", b"Subject: s\n\n", ["www-data"], ["web@example.com"]),
    ("alias_result_deduped", b"To: root, admin@example.com\nCc: root@web1.example.com\n\n", [],
     ["admin@example.com"]),
    ("other_host_not_aliased", b"To: root@other.example\n\n", [], ["root@other.example"]),
    ("idna_domain", "To: u@例子.测试\n\n".encode(), [], ["u@xn--fsqu00a.xn--0zwm56d"]),
    ("utf8_local_part", "To: 用户@例子.测试\n\n".encode(), [], ["用户@例子.测试"]),
]


@cases("text, argv, expected", RECIPIENT_CASES)
def test_recipients(text, argv, expected):
    _, env = prep(text, argv=argv)
    assert env.recipients == expected
    assert env.sender == LOGIN
    assert env.smtputf8 == (not all(r.isascii() for r in expected))


def test_without_t_headers_give_no_recipients_but_policy_still_applies():
    block, env = prep(b"From: x@y.test\nTo: a@x.test\nBcc: b@x.test\n\n", t=False, argv=["c@x.test"])
    assert env.recipients == ["c@x.test"]
    assert fields_named(block, b"bcc") == []
    assert fields_named(block, b"From") == [b"From: alice@163.com"]
    assert fields_named(block, b"Date") and fields_named(block, b"Message-ID")


def test_default_alias_catches_every_local_name():
    policy = HeaderPolicy(sender=LOGIN, aliases={"default": "ops@example.com"}, local_hostname="h")
    _, env = prep(b"To: root, nobody@h, www-data@localhost\n\n", policy=policy)
    assert env.recipients == ["ops@example.com"]


ERROR_CASES = [
    ("nothing", b"Subject: s\n\n", [], True, UsageError,
     "no recipients: give them as arguments or use -t with To/Cc/Bcc headers"),
    ("no_t_no_argv", b"To: a@x.test\n\n", [], False, UsageError, "no recipients"),
    ("undisclosed_only", b"To: undisclosed-recipients:;\n\n", [], True, UsageError, "no recipients"),
    ("resent_without_resent_to", b"To: a@x.test\nResent-From: b@x.test\n\n", [], True, UsageError,
     "no recipients"),
    ("cve_2023_27043_shape", b"To: alice@example.org)<bob@example.org>\n\n", [], True, DataError,
     "alice@example.org)<bob@example.org>"),
    ("double_at", b"To: bad@@x.test, good@x.test\n\n", [], True, DataError, "bad@@x.test"),
    ("empty_domain", b"To: root@\n\n", [], True, DataError, "root@"),
    ("null_address", b"To: <>\n\n", [], True, DataError, "<>"),
    ("unclosed_angle", b"To: Name <a@x.test\n\n", [], True, DataError, "Name <a@x.test"),
    ("bad_bcc", b"To: a@x.test\nBcc: @@\n\n", [], True, DataError, "in Bcc"),
    ("argv_space_separated", b"Subject: s\n\n", ["a@x.test b@x.test"], True, DataError, "a@x.test b@x.test"),
    ("argv_with_crlf", b"Subject: s\n\n", ["a@x.test\r\nBcc: v@x.test"], True, DataError, "cannot parse recipient"),
    # SMTP_LOCAL_MAIL=refuse (these cases run with REFUSE; the default sends such mail to the login)
    ("missing_alias", b"To: nobody\n\n", [], True, DataError,
     "'nobody' has no alias (set SMTP_ALIASES=name:address"),
    ("missing_alias_this_host", b"Subject: s\n\n", ["cron@web1.example.com"], True, DataError,
     "'cron@web1.example.com' has no alias"),
]
REFUSE = POLICY._replace(local_mail="refuse")


@cases("text, argv, t, exc, message", ERROR_CASES)
def test_recipient_errors(text, argv, t, exc, message):
    with pytest.raises(exc) as info:
        prep(text, argv=argv, t=t, policy=REFUSE)
    assert message in str(info.value)
    assert info.value.exit_code == {UsageError: 64, DataError: 65}[exc]


def test_parse_recipient_args_and_resolve_local():
    assert parse_recipient_args(["a@x.test,b@x.test", '"Doe, J" <j@x.test>', "root", ""]) == [
        "a@x.test", "b@x.test", "j@x.test", "root"]
    assert resolve_local("root", ALIASES, "web1") == "admin@example.com"
    assert resolve_local("Root@WEB1", ALIASES, "web1") == "admin@example.com"
    assert resolve_local("root@web1.example.com", ALIASES, "web1") == "root@web1.example.com"
    with pytest.raises(DataError, match="set SMTP_ALIASES=name:address"):
        resolve_local("cron", ALIASES, "web1")
    assert resolve_local("cron", ALIASES, "web1", LOGIN) == LOGIN  # SMTP_LOCAL_MAIL=login
    assert resolve_local("cron", {"default": "ops@x.test"}, "web1", LOGIN) == "ops@x.test"
    with pytest.raises(DataError, match="has no alias"):
        resolve_local("@web1", ALIASES, "web1", LOGIN)  # no name: nothing to deliver to


def test_local_names_without_alias_go_to_the_login_by_default():
    """SMTP_LOCAL_MAIL=login (the default): a local name without an alias reaches the login, the
    name kept as X-Original-To (one per name, at the top), as To's display name and as orig_to."""
    policy = HeaderPolicy(sender=LOGIN, aliases={"root": "admin@example.com"}, local_hostname="web1")
    block, env = prep(b"From: root (Cron Daemon)\nTo: www-data\nCc: Web <www-data@localhost>, root\nSubject: s\n\n",
                      argv=["nobody@web1", "bob@x.test"], policy=policy)
    assert env.recipients == [LOGIN, "bob@x.test", "admin@example.com"]
    assert env.orig_to == {LOGIN: "nobody@web1", "admin@example.com": "root"}
    assert env.local_names == [["nobody@web1", LOGIN, "no alias; SMTP_LOCAL_MAIL=login"],
                               ["www-data", LOGIN, "no alias; SMTP_LOCAL_MAIL=login"],
                               ["www-data@localhost", LOGIN, "no alias; SMTP_LOCAL_MAIL=login"],
                               ["root", "admin@example.com", "alias root"]]
    assert block.startswith(b"X-Original-To: nobody@web1\r\nX-Original-To: www-data\r\n"
                            b"X-Original-To: www-data@localhost\r\nX-Original-To: root\r\nFrom: ")
    assert fields_named(block, b"To") == [b"To: www-data <alice@163.com>"]
    assert fields_named(block, b"Cc") == [b"Cc: Web <alice@163.com>, root <admin@example.com>"]
    message = parsed(block)
    assert message["To"].addresses[0].display_name == "www-data" and not message.defects


def test_smtp_local_mail_refuse_keeps_the_refusal_and_the_field_as_written():
    policy = HeaderPolicy(sender=LOGIN, local_mail="refuse")
    with pytest.raises(DataError, match="'root' has no alias .*SMTP_LOCAL_MAIL=login"):
        prep(b"To: root\n\n", policy=policy)
    block, env = prep(b"To: root\n\n", t=False, argv=["bob@x.test"], policy=policy)
    assert fields_named(block, b"To") == [b"To: root"] and env.orig_to is None and env.local_names is None
    assert not fields_named(block, b"X-Original-To")


def test_ordinary_mail_gets_no_x_original_to():
    block, env = prep(b"To: a@x.test\n\n")
    assert not fields_named(block, b"X-Original-To") and env.orig_to is None and env.local_names is None


@pytest.mark.parametrize("name", [b"Bcc", b"BCC", b"bcc", b"bCc", b"Resent-Bcc", b"RESENT-BCC"])
def test_bcc_fields_removed_in_any_spelling(name):
    text = b"From: alice@163.com\nTo: a@x.test\n" + name + b": hidden@x.test,\n\tother@x.test\nSubject: s\n\n"
    block, env = prep(text)
    assert b"hidden" not in block and b"other@x.test" not in block
    assert block.startswith(b"From: alice@163.com\r\nTo: a@x.test\r\nSubject: s\r\n")
    if not name.lower().startswith(b"resent"):
        assert env.recipients == ["a@x.test", "hidden@x.test", "other@x.test"]


# ---------------------------------------------------------------------------------------------
# From policy

UNTOUCHED = (
    b"Received: from web1 (localhost [127.0.0.1])\r\n\tby web1 with ESMTP id 4Tx; Mon, 1 Jan 2024\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel;\r\n"
    b"\th=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b"\tb=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSBqdXN0IGEgbG9uZyBmb2xkZWQgdmFsdWU=\r\n"
    b"Subject: A very long subject line that goes well past the seventy-eight character mark,\r\n"
    b"   folded   oddly , with  double  spaces  kept , and a second fold\r\n"
    + "X-Raw-UTF8: 中文标题 raw utf-8\r\n".encode()
    + b"Content-Type: text/plain; charset=utf-8\r\n"
)


def test_from_equal_to_login_leaves_headers_byte_identical():
    text = (b"From: Alice <Alice@163.COM>\r\nTo: a@x.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <1@x.test>\r\n" + UNTOUCHED + b"\r\n")
    block, env = prep(text)
    assert block == text
    assert env.requested_sender == "Alice@163.COM" and env.message_id == "<1@x.test>"


def test_rewrite_keeps_every_other_field_verbatim_and_in_order():
    text = b"To: a@x.test\r\n" + UNTOUCHED + b"From: =?gb2312?B?1cXI/Q==?= <www-data@web1.local>\r\n\r\n"
    block, env = prep(text)
    assert block.startswith(b"To: a@x.test\r\n" + UNTOUCHED + b"From: =?utf-8?b?5byg5LiJ?= <alice@163.com>\r\n")
    message = parsed(block)
    assert message["From"].addresses[0].display_name == "张三"
    assert message["Reply-To"].addresses[0].addr_spec == "www-data@web1.local"
    assert env.requested_sender == "www-data@web1.local"


FROM_CASES = [
    ("gb2312_encoded_name", b"From: =?gb2312?B?1cXI/Q==?= <www-data@web1.local>\n", None,
     "张三", "alice@163.com", "www-data@web1.local"),
    ("raw_gbk_name", b"From: \xd5\xc5\xc8\xfd <www-data@web1.local>\n", None, "张三", "alice@163.com",
     "www-data@web1.local"),
    ("raw_utf8_name", "From: 李四 <l@x.test>\n".encode(), None, "李四", "alice@163.com", "l@x.test"),
    ("quoted_name_with_comma", b'From: "Zhang, San (IT)" <z@x.test>\n', None, "Zhang, San (IT)",
     "alice@163.com", "z@x.test"),
    ("cron_comment_name", b"From: root (Cron Daemon)\n", "CronDaemon", "Cron Daemon", "alice@163.com", None),
    ("cronie_quoted_name", b'From: "(Cron Daemon)" <root@web1>\n', "CronDaemon", "(Cron Daemon)",
     "alice@163.com", "root@web1"),
    ("full_name_when_none", b"From: root\n", "CronDaemon", "CronDaemon", "alice@163.com", None),
    ("full_name_when_address_only", b"From: wordpress@site.test\n", "Anacron", "Anacron", "alice@163.com",
     "wordpress@site.test"),
    ("missing_from", b"", None, "", "alice@163.com", None),
    ("missing_from_with_F", b"", "CronDaemon", "CronDaemon", "alice@163.com", None),
    ("two_addresses", b"From: a@x.test, b@x.test\n", None, "", "alice@163.com", "a@x.test"),
    ("quoted_local_part", b'From: "a b"@x.test\n', None, "", "alice@163.com", '"a b"@x.test'),
    ("two_from_fields", b"From: a@x.test\nFrom: alice@163.com\n", None, "", "alice@163.com", "a@x.test"),
    ("unparsable_from", b"From: <<<garbage\n", "Web", "Web", "alice@163.com", None),
]


@cases("from_line, full_name, name, address, reply_to", FROM_CASES)
def test_from_rewrite(from_line, full_name, name, address, reply_to):
    policy = HeaderPolicy(sender=LOGIN, aliases=ALIASES, full_name=full_name)
    block, env = prep(from_line + b"To: a@x.test\nSubject: s\n\n", policy=policy)
    message = parsed(block)
    assert len(fields_named(block, b"From")) == 1
    (mailbox,) = message["From"].addresses
    assert (mailbox.display_name, mailbox.addr_spec) == (name, address)
    assert block.isascii()  # non-ASCII names are RFC 2047-encoded
    if reply_to:
        assert message["Reply-To"].addresses[0].addr_spec == reply_to
    else:
        assert message["Reply-To"] is None
    assert env.sender == LOGIN


def test_from_rewrite_folds_a_long_chinese_name():
    name = "张" * 36
    block, _ = prep(f"From: {name} <z@x.test>\nTo: a@x.test\n\n".encode())
    assert all(len(line) <= 78 for line in block.split(b"\r\n"))
    # RFC 2047 §6.2: the folding white space between encoded-words is not part of the text
    # (the email package's phrase parser keeps it, so decode the raw field instead)
    raw = block.partition(b"From: ")[2].partition(b"\r\nReply-To:")[0].decode()
    assert raw.count("=?utf-8?b?") == 3
    assert str(make_header(decode_header(raw))) == f"{name} <{LOGIN}>"


def test_existing_reply_to_is_not_overwritten():
    block, _ = prep(b"From: z@x.test\nReply-To: Desk <desk@x.test>\nTo: a@x.test\n\n")
    assert fields_named(block, b"Reply-To") == [b"Reply-To: Desk <desk@x.test>"]


INJECTIONS = [
    ("F_crlf", b"From: root\n", "Mallory\r\nBcc: victim@x.test"),
    ("F_lf", b"", "Mallory\nBcc: victim@x.test"),
    ("F_nul", b"", "Mallory\0Bcc: victim@x.test"),
    ("encoded_crlf_display_name", b"From: =?utf-8?q?Mallory=0D=0ABcc:_victim@x.test?= <m@x.test>\n", None),
    ("encoded_lf_in_quoted_word", b'From: "=?utf-8?b?TWFsbG9yeQpCY2M6IHZpY3RpbUB4LnRlc3Q=?=" <m@x.test>\n', None),
]


@cases("from_line, full_name", INJECTIONS)
def test_header_injection_never_creates_a_field(from_line, full_name):
    policy = HeaderPolicy(sender=LOGIN, full_name=full_name)
    block, env = prep(from_line + b"To: a@x.test\n\n", policy=policy)
    assert b"\0" not in block
    assert_crlf_only(block)
    lines = [line for line in block.split(b"\r\n") if line and line[:1] not in b" \t"]
    names = [line.split(b":")[0].lower() for line in lines]
    assert b"bcc" not in names and b"victim" not in b" ".join(names)
    assert env.recipients == ["a@x.test"]
    assert parsed(block)["From"].addresses[0].addr_spec == LOGIN


def test_reject_policy_refuses_a_different_from():
    policy = HeaderPolicy(sender=LOGIN, from_policy="reject")
    with pytest.raises(PolicyError) as info:
        prep(b"From: Mallory <mallory@evil.example>\nTo: a@x.test\n\n", policy=policy)
    assert str(info.value) == ("From: mallory@evil.example differs from the login alice@163.com "
                               "(SMTP_FROM_POLICY=reject)")
    assert info.value.exit_code == 77


def test_reject_policy_accepts_the_login_and_adds_a_missing_from():
    policy = HeaderPolicy(sender=LOGIN, from_policy="reject")
    text = b"From: alice@163.com\r\nTo: a@x.test\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\n"
    assert prep(text, policy=policy)[0] == text
    block, _ = prep(b"To: a@x.test\n\n", policy=policy)
    assert fields_named(block, b"From") == [b"From: alice@163.com"]


@pytest.mark.parametrize("sender_line", [b"Sender: other@x.test", b"SENDER: alice@163.com"])
@pytest.mark.parametrize("from_line", [b"From: alice@163.com", b"From: other@x.test"])
def test_sender_field_is_removed(sender_line, from_line):
    block, _ = prep(from_line + b"\n" + sender_line + b"\nTo: a@x.test\n\n")
    assert fields_named(block, b"Sender") == []


@pytest.mark.parametrize("requested, from_line, expected", [
    ("www-data@web1", b"From: x@y.test\n", "www-data@web1"),
    (None, b"From: x@y.test\n", "x@y.test"),
    (None, b"From: root (Cron Daemon)\n", "root"),
    (None, b"", None),
], ids=["f_flag_wins", "from_header", "bare_from", "none"])
def test_requested_sender_is_reported(requested, from_line, expected):
    _, env = prep(from_line + b"To: a@x.test\n\n", requested=requested)
    assert (env.requested_sender, env.sender) == (expected, LOGIN)


# ---------------------------------------------------------------------------------------------
# Date, Message-ID, To; messages without a header block; the final bytes

def test_date_and_message_id_added_when_absent():
    block, env = prep(b"To: a@x.test\n\n")
    (date,) = fields_named(block, b"Date")
    assert email.utils.parsedate_to_datetime(date[6:].decode()).timestamp() == NOW
    (message_id,) = fields_named(block, b"Message-ID")
    assert re.fullmatch(rb"Message-ID: <[^<>@\s]+@163\.com>", message_id)
    assert env.message_id == message_id[12:].decode()
    assert prep(b"To: a@x.test\n\n")[1].message_id != env.message_id


def test_message_id_domain_without_an_address_login():
    _, env = prep(b"To: a@x.test\n\n", policy=HeaderPolicy(sender="alice", local_hostname="web1.test"))
    assert env.message_id.endswith("@web1.test>")


def test_date_and_message_id_kept_when_present():
    text = b"From: alice@163.com\nTo: a@x.test\ndate: Mon, 1 Jan 2024 00:00:00 +0000\nMESSAGE-ID:\n <k@x.test>\n\n"
    block, env = prep(text)
    assert block == text.replace(b"\n", b"\r\n")
    assert env.message_id == "<k@x.test>"


@pytest.mark.parametrize("text, to_added", [
    (b"Subject: s\n\n", True), (b"Cc: c@x.test\n\n", False), (b"to: t@x.test\n\n", False),
    (b"Bcc: b@x.test\n\n", True),
], ids=["none", "cc_only", "to", "bcc_only"])
def test_undisclosed_recipients_to_only_when_no_to_or_cc(text, to_added):
    block, _ = prep(text, argv=["a@x.test"])
    assert (b"To: undisclosed-recipients:;\r\n" in block) == to_added


def message_bytes(stdin: bytes, *, argv=("root",), t=False, dot_ends=False) -> tuple[bytes, object]:
    reader = MessageReader(io.BytesIO(stdin), dot_ends=dot_ends, chunk_size=5)
    block, env = prepare(reader.read_header_block(), extract_recipients=t, argv_recipients=list(argv),
                         requested_sender=None, policy=POLICY, now=NOW)
    body = io.BytesIO()
    env = complete_envelope(env, block, reader.copy_body(body))
    return block + body.getvalue(), env


@pytest.mark.parametrize("stdin, body", [
    (b"hi\n", b"hi\r\n"),
    (b"", b""),
    (b"Subject: only headers", b""),
    (b"Subject: s\nhello: not a header? yes it is\nplain line\n", b"plain line\r\n"),
    (b"\nbody after empty first line\n", b"body after empty first line\r\n"),
], ids=["echo_hi", "empty", "headers_without_separator", "body_without_separator", "separator_first"])
def test_messages_without_a_proper_header_block_become_valid(stdin, body):
    data, env = message_bytes(stdin)
    header, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and rest == body
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert not message.defects
    assert message["From"] == LOGIN and message["Date"] and message["Message-ID"]
    assert env.recipients == ["admin@example.com"] and env.size == len(data)


@pytest.mark.parametrize("stdin, eight_bit", [
    (b"Subject: s\n\nascii\n", False),
    ("Subject: 中文\n\nascii\n".encode(), True),
    ("Subject: s\n\n正文\n".encode(), True),
], ids=["ascii", "raw_utf8_header", "8bit_body"])
def test_complete_envelope_flags_and_size(stdin, eight_bit):
    data, env = message_bytes(stdin)
    assert (env.eight_bit, env.size, env.smtputf8) == (eight_bit, len(data), False)
    assert data.endswith(stdin.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n"))


# ---------------------------------------------------------------------------------------------
# Property: whatever the header values, prepare fails only with a ShimError, never a crash

HEADER_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(to=HEADER_TEXT, sender=HEADER_TEXT, argv=st.lists(HEADER_TEXT, max_size=2), t=st.booleans())
def test_prepare_property(to, sender, argv, t):
    block = f"From: {sender}\r\nTo: {to}\r\nBcc: {to}\r\n\r\n".encode()
    try:
        new, env = prepare(block, extract_recipients=t, argv_recipients=argv, requested_sender=None,
                           policy=POLICY, now=NOW)
    except ShimError:
        return
    assert new.endswith(b"\r\n\r\n") and not fields_named(new, b"bcc")
    assert_crlf_only(new)
    assert env.recipients and all("@" in r for r in env.recipients)
    assert parsed(new)["From"].addresses[0].addr_spec == LOGIN


@pytest.mark.parametrize("field, expected", [
    (b"To: root", b"To: root <admin@example.com>"),
    (b"To: Ops <root@web1>, bob@example.com", b"To: Ops <admin@example.com>, bob@example.com"),
    (b"Cc: team: root, x@y.z;", b"Cc: team: root <admin@example.com>, x@y.z;"),
    (b"To: www-data", b"To: www-data <alice@163.test>"),  # no alias: the login (SMTP_LOCAL_MAIL=login)
    (b"To: bob@example.com,\r\n  carol@example.com", b"To: bob@example.com,\r\n  carol@example.com"),
], ids=["bare", "host-and-display-name", "group", "no-alias", "untouched-folding"])
def test_local_names_in_visible_recipient_fields_are_qualified(field, expected):
    policy = HeaderPolicy(sender="alice@163.test", aliases={"root": "admin@example.com"}, local_hostname="web1")
    headers, _ = prepare(field + b"\r\nSubject: x\r\n\r\n", extract_recipients=False,
                         argv_recipients=["x@y.z"], requested_sender=None, policy=policy)
    assert headers.startswith(expected + b"\r\nSubject: x\r\n")
