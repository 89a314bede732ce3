"""The message on stdin → CRLF-normalised bytes, as sendmail reads it; no header parsing.

Sendmail's rules (`MessageReader`):

- Without ``-i``/``-oi`` (``dot_ends=True``) a line holding a single ``.`` ends the message and a
  leading ``..`` becomes ``.`` (other lines starting with a dot are kept, as in sendmail's
  non-SMTP mode); a final ``.`` without a newline also ends it. The rest of a piped input is then
  read and discarded, so the writer never gets EPIPE and nothing is sent before EOF; on a terminal
  the dot ends the input, as it does with sendmail.
- With ``-i`` the input is read verbatim to EOF.
- Every ``\\r\\n``, lone ``\\r`` and lone ``\\n`` is one line end, written as CRLF, so no
  bare-CR/bare-LF sequence can end DATA early on a lenient receiver (SMTP smuggling). A missing
  final newline is added. A leading mbox ``From `` line is removed.
- A line longer than 998 octets is broken as Postfix does it (``smtp_line_length_limit``):
  after 998 octets a CRLF and one SPACE are inserted, so the rest becomes a continuation line
  (in a header it stays part of the same field) and no line exceeds 998 octets.
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
        self._cr = False  # the last chunk ended in CR, which may be the first half of a CRLF
        self._partial = b""  # LF-normalised start of a line whose end has not been read yet
        self._done = False  # the message has ended (EOF or the terminating dot)
        self._eof = False  # the stream is exhausted (or, on a terminal, abandoned at the dot)
        self._out = b""  # finished CRLF lines not handed out yet
        self._pos = 0

    def read_header_block(self) -> bytes:
        """CRLF-normalised header block including its terminating empty line (b"\\r\\n") if there
        is one; b"" if the message has no header block; mbox From_ line removed."""
        line = self._next_line()
        if self._mbox_from and line is not None and line.startswith(b"From "):
            line = self._next_line()
        if line is None or not (line == b"\r\n" or _FIELD_LINE.match(line)):
            self._unread(line)
            return b""
        block = []
        size = 0
        while line is not None:
            if line != b"\r\n" and not _FIELD_LINE.match(line) and line[:1] not in (b" ", b"\t"):
                self._unread(line)
                break
            size += len(line)
            if size > MAX_HEADER_BLOCK:
                raise DataError(_("header block larger than 1 MiB"))
            block.append(line)
            if line == b"\r\n":
                break
            line = self._next_line()
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

    def _next_line(self) -> bytes | None:
        while True:
            end = self._out.find(b"\r\n", self._pos)
            if end >= 0:
                line = self._out[self._pos : end + 2]
                self._pos = end + 2
                return line
            if self._done:
                return None
            self._out, self._pos = self._process(), 0  # _out held only whole lines: it is used up

    def _unread(self, line: bytes | None) -> None:
        if line is not None:
            self._pos -= len(line)

    def _process(self) -> bytes:
        """Read one chunk; return the lines it completes, as CRLF-terminated bytes."""
        raw = self._read(self._chunk_size)
        self._eof = not raw
        data = b"\r" + raw if self._cr else raw
        self._cr = not self._eof and data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        text = self._partial + data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._partial = lines.pop()
        if self._eof:
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
        self._done = True
        if self._stream.isatty():
            self._eof = True  # a person typed the dot: stop here, as sendmail does
        else:
            self.drain()


def _unstuff(line: bytes) -> bytes:
    return line[1:] if line.startswith(b"..") else line


def _break_line(line: bytes) -> list[bytes]:
    """Postfix's smtp_line_length_limit: CRLF SPACE after every 998 octets."""
    pieces = []
    while len(line) > MAX_LINE:
        pieces.append(line[:MAX_LINE])
        line = b" " + line[MAX_LINE:]
    pieces.append(line)
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
