"""Bounded parsing of the address fields (`address_header`) that the header policy
(`message.prepare`) reads: recipients, From, the local names it rewrites.

Addresses are parsed with the header registry under ``policy.SMTP``; any defect other than
obsolete syntax, a non-ASCII local part or a bare local name (which the alias map resolves)
makes a field unparsable (None).

Bounded in time (issue 13: the pickup runs the header policy for every local user's message, and
the header registry's parser is quadratic on some inputs: a 48 KB To: took 8–20 s, so one user
could stall everyone else's mail). A field of at most MAX_ELEMENT (1,024) characters is parsed
whole, as before; a longer one is cut at its top-level commas in one linear pass (`_units`) and
each address is parsed on its own, in the context the whole field gives it, so the result is the
same (a long field in which an encoded word could straddle a special character cannot be cut
safely and counts as unparsable). Each field is parsed once per message (`Bounds`, one per
message, holds the results, the counts and the CPU deadline). Refused (`DataError`, exit 65): an
address field longer than 64 KiB, more than 256 KiB of address fields, an address or group name
longer than 1,024 characters, more than 1,000 addresses in To/Cc/Bcc (with their Resent- forms;
From has 1,000 of its own), and a message whose address parsing takes more than PARSE_BUDGET
(0.5 s) of this thread's CPU time, checked between addresses ("header too complex to parse").
One message's header policy costs at most ~530 ms on this machine (the budget plus one address
or short field, ≤ 25 ms; 2-core AMD EPYC, Python 3.11, ``bench/run.py`` rows 6: the worst shape
of each kind at the caps took 500–520 ms), against 80–110 ms for 1,000 ordinary recipients and
under 1 ms for an ordinary 2 KB message.
"""

import bisect
import re
import time
from email import _header_value_parser as value_parser
from email import errors, policy as email_policy
from email.headerregistry import Group
from types import SimpleNamespace
from typing import NamedTuple

from .errors import DataError
from .i18n import _
from .pickup import MAX_RECIPIENTS

# The header registry reports a bare local name ("root") with this defect; aliases resolve it.
_NO_DOMAIN = "addr-spec local part with no domain"

# Caps that real mail never meets; past them the message is refused (DataError, exit 65).
MAX_ADDRESS_FIELD = 64 * 1024  # characters of one address field (unfolded)
MAX_ADDRESS_TEXT = 256 * 1024  # characters of all the address fields one message has parsed
MAX_ELEMENT = 1024  # characters of one address, or of a group's name; a shorter field is parsed whole
MAX_ADDRESSES = MAX_RECIPIENTS  # addresses (and groups) in To/Cc/Bcc and Resent-To/-Cc/-Bcc together
PARSE_BUDGET = 0.5  # seconds of this thread's CPU time for the address parsing of one message

_SPECIALS = re.compile(r'["\\()<>\[\],:;@]')  # what changes the lexer's state, outside quotes etc.
_QUOTED_STOP = re.compile(r'["\\]')
_COMMENT_STOP = re.compile(r"[()\\]")
_LITERAL_STOP = re.compile(r"[\[\]\\]")
_EW_START = re.compile(r"=\?")
_EW_END = re.compile(r"\?=")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")


class Bounds(SimpleNamespace):
    """What one message's address parsing has used: CPU time, characters, addresses; and the
    results by field text (a field is parsed once, however many steps of the policy read it)."""

    def __init__(self):
        super().__init__(deadline=time.thread_time() + PARSE_BUDGET, text=0, addresses=0, parsed={})

    def check(self) -> None:
        if time.thread_time() > self.deadline:
            raise DataError(_("header too complex to parse (its address fields take over {ms} ms)").format(
                ms=int(PARSE_BUDGET * 1000)))


class _Addresses(NamedTuple):
    """An address field as parsed: its groups as the header registry gives them (a lone mailbox
    is a group without a name) and the texts the registry parsed for it, in order."""

    groups: tuple
    pieces: tuple

    @property
    def addresses(self) -> tuple:
        return tuple(a for g in self.groups for a in g.addresses)


class _Unparsable(Exception):
    """The field's structure is broken or too unusual to cut: it is parsed as unparsable."""


def address_header(name: str, text: str, bounds: Bounds, label: str, *, recipients: bool = True):
    """`text` (an address field's value) parsed under policy.SMTP within `bounds`: an `_Addresses`,
    or None if it has a real defect; DataError when it passes a cap (module constants). Addresses
    in a field with `recipients` count towards the message's MAX_ADDRESSES; another field (From)
    has MAX_ADDRESSES of its own."""
    if text in bounds.parsed:
        return bounds.parsed[text]
    if len(text) > MAX_ADDRESS_FIELD:
        raise DataError(_("{header}: address field longer than {limit} KiB").format(
            header=label, limit=MAX_ADDRESS_FIELD // 1024))
    bounds.text += len(text)
    if bounds.text > MAX_ADDRESS_TEXT:
        raise DataError(_("address fields longer than {limit} KiB in all").format(
            limit=MAX_ADDRESS_TEXT // 1024))
    bounds.check()
    if len(text) <= MAX_ELEMENT:  # parsed whole, as it always was
        header = _registry(name, text)
        result = header and _Addresses(header.groups, (text,))
        _count(len(result.addresses) if result else 0, bounds, label, recipients)
    else:  # cut, counted, then parsed piece by piece
        try:
            units = _units(text, bounds, label)
        except _Unparsable:
            units = None
        count = sum(1 + len(unit[2]) if unit[0] == "group" else 1 for unit in units or ())
        _count(count, bounds, label, recipients)
        result = None if units is None else _parse_units(name, units, bounds)
    bounds.check()
    bounds.parsed[text] = result
    return result


def _count(count: int, bounds: Bounds, label: str, recipients: bool) -> None:
    """`count` more addresses: refused past MAX_ADDRESSES (for the recipient fields together)."""
    if recipients:
        bounds.addresses += count
    if (bounds.addresses if recipients else count) > MAX_ADDRESSES:
        raise DataError(_("more than {most} addresses in {fields}").format(
            most=MAX_ADDRESSES, fields="To, Cc and Bcc" if recipients else label))


def _registry(name: str, piece: str):
    """`piece` parsed by the header registry under policy.SMTP; None if it has a real defect."""
    try:
        header = email_policy.SMTP.header_factory(name, piece)
    except Exception:  # the parser also crashes on some malformed input
        # (ValueError for an encoded CR/LF, IndexError for "a@", HeaderParseError, TypeError,
        # AttributeError found by the property test): all of it means "cannot parse"
        return None
    tolerated = (errors.ObsoleteHeaderDefect, errors.NonASCIILocalPartDefect)
    for defect in header.defects:
        if not isinstance(defect, tolerated) and str(defect) != _NO_DOMAIN:
            return None
    if any(not a.username for a in header.addresses):
        return None
    return header


def _parse_units(name: str, units: list, bounds: Bounds) -> _Addresses | None:
    """The pieces of `_units` parsed one by one; None as soon as one has a real defect."""
    groups, pieces = [], []
    for unit in units:
        bounds.check()
        header = _registry(name, unit[1])
        if header is None:
            return None
        pieces.append(unit[1])
        if unit[0] == "address":
            groups += header.groups
            continue
        members = []
        for piece in unit[2]:
            bounds.check()
            member = _registry(name, piece)
            if member is None:
                return None
            pieces.append(piece)
            members += member.addresses
        groups.append(Group(header.groups[0].display_name, members))
    return _Addresses(tuple(groups), tuple(pieces))


def _units(text: str, bounds: Bounds, label: str) -> list:
    """An address field cut at its top-level commas, in one pass: ``("address", piece)`` for a
    mailbox, ``("group", frame, [piece, ...])`` for a group and its members. Each piece is what
    the registry would parse there in the whole field, in the same context: the separator after
    it is kept (an encoded word's defects depend on it); a group's members are parsed as members
    of a one-letter group, after a comma unless first; the frame is the group without its members.
    Raises `_Unparsable` when the structure is broken or an encoded word's extent (as the
    registry finds it: up to the next ``?=``) would cross a special character, and DataError for
    a piece longer than MAX_ELEMENT. Blank pieces are left out (the registry finds nothing there)."""
    if _encoded_word_crosses(text, bounds):
        raise _Unparsable
    units, n = [], len(text)
    start = pos = 0
    angle = domain = False  # inside <...>; just after "@" (a "[" starts a domain literal)
    colon = None  # where the open group's name ends
    members, member_start = [], 0
    closed = None  # (colon, semicolon, members) of the group this element held
    seen = 0
    while True:
        match = _SPECIALS.search(text, pos)
        i = match.start() if match else n
        if domain and text[pos:i].strip(" \t"):
            domain = False
        if i < n:
            c, pos = text[i], i + 1
            seen += 1
            if not seen % 1024:
                bounds.check()
            if c == '"':
                pos, domain = _end_of(text, pos, _QUOTED_STOP, '"'), False
                continue
            if c == "(":
                pos = _end_of_comment(text, pos)
                continue
            if c == "[" and domain:
                pos, domain = _end_of(text, pos, _LITERAL_STOP, "]", "["), False
                continue
            domain = c == "@"
            if c == "@" or (angle and c in ",:"):  # an obsolete route's commas and colon
                continue
            if (c == "<" and not angle) or (c == ">" and angle):
                angle = not angle
                continue
            if c == ":" and colon is None and closed is None and not angle:
                colon, members, member_start = i, [], i + 1
                continue
            if c in ",;" and colon is not None and not angle:  # the end of a group member
                member = text[member_start:i]
                if member.strip(" \t"):
                    _check_piece(len(member), label)
                    members.append(("g:," if members else "g:") + member + (c if c == ";" else ",;"))
                member_start = i + 1
                if c == ";":
                    closed, colon = (colon, i, members), None
                continue
            if c != "," or angle:
                raise _Unparsable
        elif angle or colon is not None:
            raise _Unparsable
        sep = "," if i < n else ""
        if closed is None:
            if text[start:i].strip(" \t"):
                _check_piece(i - start, label)
                units.append(("address", text[start:i] + sep))
        else:
            at, semicolon, group_members = closed
            _check_piece(at + 1 - start + i - semicolon, label)
            if semicolon == at + 1:  # "name:;", which the registry reads in its own way
                frame = text[start:i] + sep
            else:  # its members parsed apart, the group is parsed as "name: ;"
                frame = text[start : at + 1] + " ;" + text[semicolon + 1 : i] + sep
            units.append(("group", frame, group_members))
            closed = None
        if i == n:
            return units
        start = pos


def _check_piece(length: int, label: str) -> None:
    if length > MAX_ELEMENT:
        raise DataError(_("{header}: an address longer than {limit} characters").format(
            header=label, limit=MAX_ELEMENT))


def _end_of(text: str, pos: int, stop, close: str, refused: str = "") -> int:
    """After the `close` that ends the quoted string or domain literal whose text starts at pos."""
    while True:
        match = stop.search(text, pos)
        if match is None or match[0] == refused:
            raise _Unparsable
        if match[0] == close:
            return match.end()
        pos = match.end() + 1  # a backslash: the next character is taken as it is


def _end_of_comment(text: str, pos: int) -> int:
    """After the ")" that ends the (nested) comment whose text starts at pos."""
    depth = 1
    while True:
        match = _COMMENT_STOP.search(text, pos)
        if match is None:
            raise _Unparsable
        pos = match.end()
        if match[0] == "\\":
            pos += 1
            continue
        depth += 1 if match[0] == "(" else -1
        if not depth:
            return pos


def _encoded_word_crosses(text: str, bounds: Bounds) -> bool:
    """Whether the registry could take an encoded word (``=?`` up to the next ``?=``, or the one
    after when two hex digits follow, as `get_encoded_word` does) across a special character,
    where `_units` would see structure: it tries one at every ``=?``, in quotes too."""
    if "=?" not in text or "?=" not in text:
        return False
    ends = [m.start() for m in _EW_END.finditer(text)]
    specials = [m.start() for m in _SPECIALS.finditer(text)]
    marks = [m.start() for m in re.finditer(r"\?", text)]
    inside = 0  # the end of the last extent seen, which held no special character
    for count, match in enumerate(_EW_START.finditer(text), 1):
        if not count % 1024:
            bounds.check()
        if match.start() < inside and text[match.start() - 1] not in " \t":
            continue  # inside an encoded word, or the atom the registry makes of it: no word starts here
        first = match.start() + 2
        e = bisect.bisect_left(ends, first)
        if e == len(ends):
            return False  # no "?=" after this one, so none after any later "=?" either
        end = ends[e]
        marks_before = bisect.bisect_left(marks, end) - bisect.bisect_left(marks, first)
        if _HEX2.match(text, end + 2) and marks_before < 2:  # "?=XX" read as the end of the encoding
            e = bisect.bisect_left(ends, end + 2)
            end = ends[e] if e < len(ends) else len(text)
        s = bisect.bisect_left(specials, first)
        if s < len(specials) and specials[s] < end:
            return True
        inside = end + 2
    return False


def comments(parsed: _Addresses, bounds: Bounds) -> list[str]:
    """The comments of a parsed field, in order (`value_parser` keeps them; the registry drops them)."""
    comments = []
    for piece in parsed.pieces:
        bounds.check()
        comments += value_parser.get_address_list(piece)[0].comments
    return comments
