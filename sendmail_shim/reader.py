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
            pieces = _break_line(_checked(text))
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
