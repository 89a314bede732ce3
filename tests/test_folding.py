"""Over-long header lines are folded at white space (RFC 5322 §2.2.3), never cut inside a word:
unfolded (every CRLF removed), a field is exactly what the caller wrote. Only a stretch of more
than 998 octets without white space falls back to Postfix's break (CRLF SPACE after 998 octets),
which adds that space to the value. Body lines keep Postfix's break.

Unit tests read through `reader.MessageReader` (and `message.prepare` for -t); the end-to-end
tests run the real console script against the test relay."""

import email
import email.policy
import io
import re

import pytest

from sendmail_shim.message import HeaderPolicy, prepare
from sendmail_shim.reader import MAX_LINE, MessageReader, split_fields

LOGIN = "alice@163.com"
CHUNKS = [1, 7, 997, 998, 999, 1000, 65536]

WORDS = " ".join(f"word{i:04d}" for i in range(334))  # 3,005 characters of words
SUBJECT = "Subject: " + WORDS
assert 3000 <= len(WORDS) <= 3010
ADDRESSES = [f"user{i:03d}@example.com" for i in range(200)]
TO = "To: " + ", ".join(ADDRESSES)  # 4,000 octets on one line


def read(data: bytes, chunk_size: int = 65536) -> tuple[bytes, bytes]:
    reader = MessageReader(io.BytesIO(data), dot_ends=False, chunk_size=chunk_size)
    header = reader.read_header_block()
    body = io.BytesIO()
    reader.copy_body(body)
    return header, body.getvalue()


def lines_of(block: bytes) -> list[bytes]:
    return block.split(b"\r\n")[:-1]


def assert_folded(block: bytes) -> None:
    """No line over 998 octets; every continuation line starts with white space and is not white
    space alone (RFC 5322's FWS)."""
    for line in lines_of(block):
        assert len(line) <= MAX_LINE
    for line in lines_of(block)[1:]:
        assert line[:1] in (b" ", b"\t") and line.strip(b" \t"), line[:40]


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_a_3000_character_subject_of_words_unfolds_to_exactly_the_original(chunk_size):
    header, body = read(SUBJECT.encode() + b"\nX-Other: 1\n\nbody\n", chunk_size)
    subject, other = split_fields(header)
    assert_folded(subject.raw)
    assert len(lines_of(subject.raw)) == 4  # folded only where a line would pass 998 octets
    assert all(len(line) > 900 for line in lines_of(subject.raw)[:-1])
    assert subject.raw.replace(b"\r\n", b"") == SUBJECT.encode()  # unfolding restores it exactly
    assert other.raw == b"X-Other: 1\r\n" and body == b"body\r\n"
    parsed = email.message_from_bytes(header + b"\r\n", policy=email.policy.default)
    assert parsed["Subject"] == WORDS


def test_folding_keeps_tabs_and_runs_of_white_space():
    value = "\t".join(f"t{i:03d}" for i in range(300)) + "  " + "  ".join(f"s{i:03d}" for i in range(300))
    header, _ = read(f"X-Spaced: {value}\n\n".encode())
    assert_folded(header[:-2])
    assert header[:-2].replace(b"\r\n", b"") == f"X-Spaced: {value}".encode()
    assert re.search(rb"\r\n\t", header) and b" \r\n" not in header  # a fold goes before a whole run


@pytest.mark.parametrize("chunk_size", [1, 998, 65536])
def test_a_to_with_200_addresses_on_one_line_is_folded_and_keeps_every_recipient(chunk_size):
    header, _ = read(TO.encode() + b"\nSubject: s\n\n", chunk_size)
    [to, _subject] = split_fields(header)
    assert_folded(to.raw)
    assert to.raw.replace(b"\r\n", b"") == TO.encode()
    block, env = prepare(header, extract_recipients=True, argv_recipients=[], requested_sender=None,
                         policy=HeaderPolicy(sender=LOGIN), now=1_700_000_000.0)
    assert env.recipients == ADDRESSES
    assert to.raw in block  # passed on byte for byte


def test_a_header_line_without_white_space_falls_back_to_the_postfix_break():
    """The one case that changes the value: 3,000 octets with nowhere to fold get CRLF SPACE after
    every 998 (997 after the first), so unfolding leaves a space at each break."""
    token = bytes(range(33, 127)) * 32  # 3,008 octets, no white space (and no colon issue: a value)
    line = b"X-Token:" + token
    header, _ = read(line + b"\n\n")
    lines = lines_of(header)[:-1]
    assert [len(x) for x in lines] == [998, 998, 998, 25]
    assert lines[0] == line[:998] and all(x.startswith(b" ") for x in lines[1:])
    assert b"".join(lines) != line and header.replace(b"\r\n ", b"")[:-4] == line  # only the added spaces


def test_an_unbreakable_stretch_is_broken_and_folding_resumes_after_it():
    words = " ".join(f"w{i:03d}" for i in range(400))
    value = "x" * 1500 + " " + words  # a 1,500-octet token, then words
    header, _ = read(f"Subject: {value}\n\n".encode())
    lines = lines_of(header)[:-1]
    assert lines[0] == b"Subject:"  # folded before the space after the colon
    assert lines[1] == b" " + b"x" * 997 and lines[2].startswith(b" " + b"x" * 503 + b" w000 ")
    assert_folded(header[:-2])
    # unfolded, the value differs from the original only by the one space the break added
    assert header[:-2].replace(b"\r\n", b"") == b"Subject: " + b"x" * 997 + b" " + value[997:].encode()


def test_trailing_white_space_is_never_a_line_of_its_own():
    value = "x" * 997 + "   "
    header, _ = read(f"A:{value}\n\n".encode())
    lines = lines_of(header)[:-1]
    assert all(x.strip() for x in lines) and all(len(x) <= MAX_LINE for x in lines)


def test_a_header_block_of_one_mebibyte_of_words_is_folded_in_full():
    """The reader's cap (1 MiB) with lines that need folding: one long line of short words."""
    value = b"ab " * 340_000  # ~1 MB, the folds add ~2 KB: within the 1 MiB cap
    header, body = read(b"X-Big: " + value + b"\n\nbody\n")
    assert_folded(header[:-2])
    assert header[:-2].replace(b"\r\n", b"") == b"X-Big: " + value and body == b"body\r\n"


def test_body_lines_keep_the_postfix_break():
    words = (b"word " * 400).rstrip()
    _, body = read(b"Subject: s\n\n" + words + b"\n")
    assert [len(x) for x in body.split(b"\r\n")] == [998, 998, 5, 0]  # not folded at white space
    assert body.split(b"\r\n")[1].startswith(b" ")


# ---------------------------------------------------------------------------------------------
# End to end: the console script, the test relay


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["interactive", "background"])
def test_the_relay_gets_no_line_over_998_octets_and_the_subject_unfolded_as_written(shim_factory, relay, mode):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY=mode)
    message = f"{TO}\n{SUBJECT}\nX-Token: {'z' * 1200}\n\nbody line\n".encode()
    result = shim.run("-t", "-i", stdin=message)
    assert (result.exit_code, result.stderr) == (0, "")
    if mode == "background":
        from tests.faults import wait_idle

        wait_idle(shim.config_file)
    [received] = relay.messages
    assert received.rcpt_tos == ADDRESSES
    assert all(len(line) <= MAX_LINE for line in received.data.split(b"\r\n"))
    header = received.data.partition(b"\r\n\r\n")[0] + b"\r\n"
    fields = {f.name: f for f in split_fields(header)}
    assert fields["subject"].raw.replace(b"\r\n", b"") == SUBJECT.encode()
    assert fields["to"].raw.replace(b"\r\n", b"") == TO.encode()
    assert fields["x-token"].raw == b"X-Token:\r\n " + b"z" * 997 + b"\r\n " + b"z" * 203 + b"\r\n"
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed["Subject"] == WORDS and [a.addr_spec for a in parsed["To"].addresses] == ADDRESSES
