"""The message on stdin → CRLF-normalised bytes, as sendmail reads it; no header parsing.

Sendmail's rules (`MessageReader`):

- Without ``-i``/``-oi`` (``dot_ends=True``) a line holding a single ``.`` ends the message and a
  leading ``..`` becomes ``.`` (other lines starting with a dot are kept, as in sendmail's
  non-SMTP mode); a final ``.`` without a newline also ends it. The rest of a piped input is then
  read and discarded, so the writer never gets EPIPE and nothing is sent before EOF; on a terminal
  the dot ends the input, as it does with sendmail.
- With ``-i`` the input is read verbatim to EOF.
- In the body, every ``\\r\\n``, lone ``\\r`` and lone ``\\n`` is one line end, written as CRLF,
  so no bare-CR/bare-LF sequence can end DATA early on a lenient receiver (SMTP smuggling). A
  missing final newline is added. A leading mbox ``From `` line is removed.
- In the header block (and the mbox ``From `` line) a line ends only at LF: ``\\r*\\n`` is one
  line end (``\\r\\r\\n`` comes from some PHP set-ups); CRs that end the input are line ends too,
  as in the body. A CR anywhere else in a header line is refused (`DataError`): taken as a line
  end it would let ``Subject: x\\rBcc: victim`` add a header field (a recipient with ``-t``), and
  kept as data it would reach the relay as a bare CR, which relays read as a line end or refuse.
  A line that is not part of the header block (the first body line) is read with the body's
  rules; one that starts with a lone CR begins with an empty line under them, which ends the
  header block.
- No line exceeds 998 octets. A longer header line is folded (RFC 5322 §2.2.3, `_fold_header_line`):
  a CRLF is inserted before the last white space (SP or HTAB) that leaves at most 998 octets on
  the line, and so on for the rest, so the field unfolded (the CRLFs removed) is exactly what the
  caller wrote. Only a stretch of more than 998 octets without white space to fold at (a token,
  a long encoded text) is broken as Postfix does it: after 998 octets a CRLF and one SPACE are
  inserted, which adds that space to the value. A longer body line is always broken the Postfix
  way (``smtp_line_length_limit``): CRLF SPACE after 998 octets, the rest a new line.
- A NUL byte is refused (`DataError`). The header block is held in memory (at most 1 MiB); the
  body is streamed chunk by chunk.
- The header block ends at the empty line, or before the first line that is neither a header
  field nor a continuation line (that line starts the body, as in Postfix). If the first line is
  not a header field the whole input is body.
"""

import re
from typing import BinaryIO, NamedTuple

from .errors import DataError
from .i18n import _

MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
MAX_HEADER_BLOCK = 1 << 20

# A header field line: printable ASCII name, optional (obsolete) white space, colon; as Postfix.
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


class BodyInfo(NamedTuple):
    size: int
    eight_bit: bool


class MessageReader:
    """Reads a message from a binary stream with sendmail's rules (see the module docstring)."""

    def __init__(self, stream: BinaryIO, *, dot_ends: bool, mbox_from: bool = True, chunk_size: int = 65536):
        self._stream = stream
        self._read = getattr(stream, "read1", stream.read)  # read1: a typed "." is seen at once
        self._dot_ends = dot_ends
        self._mbox_from = mbox_from  # False for a stored message: its reader removed it already
        self._chunk_size = chunk_size
        self._raw = bytearray()  # input read for the header block and not taken by it yet
        self._rpos = 0  # where the untaken part of _raw starts
        self._scanned = 0  # _raw[_rpos:_scanned] holds no LF
        self._cr = False  # the last chunk ended in CR, which may be the first half of a CRLF
        self._partial = b""  # LF-normalised start of a line whose end has not been read yet
        self._done = False  # the message has ended (EOF or the terminating dot)
        self._eof = False  # the stream is exhausted (or, on a terminal, abandoned at the dot)
        self._out = b""  # finished CRLF lines not handed out yet
        self._pos = 0

    def read_header_block(self) -> bytes:
        """CRLF-normalised header block including its terminating empty line (b"\\r\\n") if there
        is one; b"" if the message has no header block; mbox From_ line removed. Lines are read
        with the header block's rules (module docstring); what follows is left to `copy_body`."""
        block: list[bytes] = []
        size = 0
        mbox_from = self._mbox_from
        while not self._done:
            line = self._header_line(MAX_LINE + 2)  # enough to tell a header line from a body line
            if line is None:
                break
            raw, length = line
            if length < 0 and not raw.strip(b"\r"):  # only CRs so far: the line end decides
                raw, length = self._whole_line(size)
            if self._dot_ends and raw == b"." and length >= 0:
                self._end_at_dot()
                break
            text = _unstuff(raw) if self._dot_ends else raw
            first, mbox_from = mbox_from, False
            if first and text.startswith(b"From "):  # the mbox From_ line: dropped
                if length < 0:
                    raw, length = self._whole_line(size)
                _checked(raw)
                self._rpos += length
                continue
            if not text and length >= 0:
                self._rpos += length
                block.append(b"\r\n")
                break
            if not (_FIELD_LINE.match(text[:MAX_LINE]) or (block and text[:1] in (b" ", b"\t"))):
                if text[:1] == b"\r":  # the body's rules make this lone CR an empty line
                    self._rpos += 1
                    block.append(b"\r\n")
                break  # the first body line: left for copy_body, which reads it with the body's rules
            if length < 0:
                raw, length = self._whole_line(size)
                text = _unstuff(raw) if self._dot_ends else raw
            pieces = _fold_header_line(_checked(text))
            size += sum(len(piece) + 2 for piece in pieces)
            if size > MAX_HEADER_BLOCK:
                raise DataError(_("header block larger than 1 MiB"))
            block += [piece + b"\r\n" for piece in pieces]
            self._rpos += length
        if self._rpos < len(self._raw) and not self._done:
            # the body read with the header block is taken now, as the chunk it came in: a NUL
            # there is refused before the caller has written anything
            self._out, self._pos = self._process(), 0
        return b"".join(block)

    def copy_body(self, out: BinaryIO) -> BodyInfo:
        """Stream the rest (CRLF-normalised, long lines broken, NUL refused) to `out`."""
        data = self._out[self._pos :]
        self._out, self._pos = b"", 0
        size, eight_bit = 0, False
        while True:
            if data:
                out.write(data)
                size += len(data)
                eight_bit = eight_bit or not data.isascii()
            if self._done:
                return BodyInfo(size, eight_bit)
            data = self._process()

    def drain(self) -> None:
        """Read and discard the rest of the input (before reporting an error: no EPIPE)."""
        while not self._eof:
            self._eof = not self._read(self._chunk_size)
        self._done = True

    def _header_line(self, limit: int) -> tuple[bytes, int] | None:
        """The next line under the header block's rules, not taken yet: its text without the line
        end (``\\r*\\n``, or one ``\\r`` of the CRs that end the input) and its length with it;
        None at the end of the input. A line with no LF within `limit` bytes comes unfinished,
        length -1."""
        while True:
            end = self._raw.find(b"\n", max(self._scanned, self._rpos))
            if end >= 0:
                return bytes(self._raw[self._rpos : end]).rstrip(b"\r"), end + 1 - self._rpos
            rest = len(self._raw) - self._rpos
            if self._eof:
                if not rest:
                    self._done = True
                    return None
                text = bytes(self._raw[self._rpos :])
                line = text.rstrip(b"\r")  # ends at the first of the final CRs (the rest: empty lines)
                return line, len(line) + (len(line) < len(text))
            if rest > limit:
                return bytes(self._raw[self._rpos : self._rpos + limit]), -1
            self._scanned = len(self._raw)
            if self._rpos > 65536 and self._rpos * 2 > len(self._raw):
                del self._raw[: self._rpos]
                self._scanned -= self._rpos
                self._rpos = 0
            chunk = self._read(self._chunk_size)
            self._eof = not chunk
            self._raw += chunk

    def _whole_line(self, size: int) -> tuple[bytes, int]:
        """The line `_header_line` gave unfinished, whole; one longer than what is left of the
        header block's 1 MiB is refused."""
        text, length = self._header_line(MAX_HEADER_BLOCK - size)
        if length < 0:
            raise DataError(_("header block larger than 1 MiB"))
        return text, length

    def _process(self) -> bytes:
        """Read one chunk; return the lines it completes, as CRLF-terminated bytes. The first chunk
        after the header block is what it left of the input."""
        if self._rpos < len(self._raw):
            raw, final = bytes(self._raw[self._rpos :]), self._eof
            self._raw, self._rpos, self._scanned = bytearray(), 0, 0
        elif self._eof:  # the header block read the end of the input already
            raw, final = b"", True
        else:
            raw = self._read(self._chunk_size)
            final = self._eof = not raw
        data = b"\r" + raw if self._cr else raw
        self._cr = not final and data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        text = self._partial + data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._partial = lines.pop()
        if final:
            if self._partial:
                lines.append(self._partial)  # no final newline: the line still counts
                self._partial = b""
            self._done = True
        # The scan for leading dots runs only on chunks that have one. What is left of a broken
        # line starts with a space, so the dot rules can be applied to every line in `lines`.
        if self._dot_ends and (b"\n." in text or text.startswith(b".")):
            self._apply_dot_rules(lines)
        pieces = []
        if len(self._partial) > MAX_LINE:
            if self._dot_ends:
                self._partial = _unstuff(self._partial)  # no-op on a rest, which starts with " "
            pieces = _break_line(self._partial)
            self._partial = pieces.pop()
        if lines and max(map(len, lines)) > MAX_LINE:
            lines = [piece for line in lines for piece in _break_line(line)]
        lines += pieces
        out = b"\r\n".join(lines) + b"\r\n" if lines else b""
        if b"\0" in out:
            raise DataError(_("message contains a NUL byte"))
        return out

    def _apply_dot_rules(self, lines: list[bytes]) -> None:
        """Lone "." ends the message, a leading ".." loses one dot; `lines` is edited in place."""
        for i, line in enumerate(lines):
            if line == b".":
                del lines[i:]
                self._end_at_dot()
                return
            lines[i] = _unstuff(line)

    def _end_at_dot(self) -> None:
        self._partial = b""
        self._raw, self._rpos, self._scanned = bytearray(), 0, 0
        self._done = True
        if self._stream.isatty():
            self._eof = True  # a person typed the dot: stop here, as sendmail does
        else:
            self.drain()


def _checked(line: bytes) -> bytes:
    """A line of the header block (or the mbox From_ line), refused if it has a lone CR or a NUL."""
    if b"\r" in line:
        raise DataError(_("a header line contains a carriage return (CR) without a line feed (LF)"))
    if b"\0" in line:
        raise DataError(_("message contains a NUL byte"))
    return line


def _unstuff(line: bytes) -> bytes:
    return line[1:] if line.startswith(b"..") else line


def _break_line(line: bytes) -> list[bytes]:
    """Postfix's smtp_line_length_limit: CRLF SPACE after every 998 octets."""
    if len(line) <= MAX_LINE:
        return [line]
    rest = range(MAX_LINE, len(line), MAX_LINE - 1)
    return [line[:MAX_LINE]] + [b" " + line[i : i + MAX_LINE - 1] for i in rest]


def _fold_header_line(line: bytes) -> list[bytes]:
    """A header line as lines of at most MAX_LINE octets whose concatenation is `line`: each
    after the first starts with the white space it was folded before (RFC 5322 §2.2.3). A fold
    goes before the last run of white space within reach that has text before it on the line
    (a line of white space alone is no valid fold) and text after it in the field (trailing white
    space is not folded at). Where no such run is within reach, the Postfix break of `_break_line`
    (CRLF SPACE after MAX_LINE octets; that space is added to the value), then folding resumes.
    Linear: each line is found with two bounded ``rfind``s and one bounded ``rstrip``."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = []
    text_end = len(line.rstrip(b" \t"))  # no fold at or after trailing white space
    start, lead = 0, b""  # where the next line starts in `line`; b" " after a Postfix break
    while len(lead) + len(line) - start > MAX_LINE:
        room = MAX_LINE - len(lead)
        end = min(start + room + 1, text_end)  # a fold at `end - 1` leaves `room` octets
        ws = max(line.rfind(b" ", start + 1, end), line.rfind(b"\t", start + 1, end))
        fold = start + len(line[start:ws].rstrip(b" \t")) if ws > start else start  # the run's start
        if fold > start:
            pieces.append(lead + line[start:fold])
            start, lead = fold, b""
        else:  # no white space to fold at within reach; what follows the break is not only the
            # trailing white space (a line of white space alone), unless that alone is too long
            cut = start + room if text_end - 1 <= start else min(start + room, text_end - 1)
            pieces.append(lead + line[start:cut])
            start, lead = cut, b" "
    pieces.append(lead + line[start:])
    return pieces


class HeaderField(NamedTuple):
    """One field of a header block, as bytes."""

    name: str  # lower case
    raw: bytes  # the whole field, continuation lines and final CRLF included

    @property
    def value(self) -> bytes:
        """The unfolded value after the colon."""
        return self.raw.partition(b":")[2].replace(b"\r\n", b"")


def split_fields(header_block: bytes) -> list[HeaderField]:
    """CRLF header block → fields, each with its continuation lines; the empty line is dropped."""
    fields: list[HeaderField] = []
    lines = header_block.split(b"\r\n")
    if not lines[-1]:
        lines.pop()  # the text after the final CRLF
    for line in lines:
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = HeaderField(fields[-1].name, fields[-1].raw + line + b"\r\n")
        else:
            name = line.partition(b":")[0].strip().decode("ascii", "replace").lower()
            fields.append(HeaderField(name, line + b"\r\n"))
    return fields


def recipient_fields(fields: list[HeaderField]) -> list[HeaderField]:
    """The fields ``-t`` takes recipients from: To, Cc and Bcc, or Resent-To/-Cc/-Bcc when any
    Resent- field is present."""
    names = ("to", "cc", "bcc")
    if any(f.name.startswith("resent-") for f in fields):
        names = ("resent-to", "resent-cc", "resent-bcc")
    return [f for f in fields if f.name in names]
