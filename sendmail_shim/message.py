"""The header policy (`prepare`) for a message read by `reader.MessageReader`.

It works on the header block as bytes: fields are split at byte level and dropped or replaced
whole; every other field passes byte-for-byte (no re-serialisation; see the
project's shared notes on python-deps).

- Recipients: command-line recipients first, then with ``-t`` the To/Cc/Bcc fields (all of them),
  or Resent-To/-Cc/-Bcc when any Resent- field is present. Addresses are parsed with the header
  registry under ``policy.SMTP``; any defect other than obsolete syntax, a non-ASCII local part or
  a bare local name (which the alias map resolves) is an error. Local names and ``user@<this
  host>``/``user@localhost`` go through the alias map (`resolve_local`): the name's alias, else
  the ``default`` alias, else — with SMTP_LOCAL_MAIL=login, the default — the login itself (the
  mailbox the admin reads); with SMTP_LOCAL_MAIL=refuse such a name is an error. Duplicates are
  dropped case-insensitively. The envelope records each resolved name (``orig_to``, the smtp log
  line's ``orig_to=``; ``local_names``, the cleanup log line that says which rule applied), and
  the message gets one ``X-Original-To: <name>`` field per resolved name at the top of its header,
  as Postfix's local delivery adds it. A To/Cc (or Resent-To/-Cc) field naming a local address
  is rewritten with its target, the name kept as the display name when the address has none
  (``To: root`` → ``To: root <alice@163.com>``), so the relay never sees a bare local name and
  the reader still sees who it was for; a field naming a local name that does not resolve
  (SMTP_LOCAL_MAIL=refuse) is left as written.
- Envelope addresses: a non-ASCII domain with an ASCII local part is IDNA-encoded, so only a
  non-ASCII local part needs SMTPUTF8.
- Bcc and Resent-Bcc fields are removed; so is Sender (From is the login after this policy, so a
  Sender would be either redundant or wrong).
- From: equal to the login → untouched. Differing → ``rewrite`` puts the login in place of the
  address and keeps the display name (else the comment of ``root (Cron Daemon)``, else ``-F``),
  and adds ``Reply-To:`` with the original mailbox when the message has none and the original
  address has an ``@``; ``reject`` raises `PolicyError`. Missing → a From with the login (and
  ``-F``) is added under both policies: adding it claims nobody else's address. Resent-From is
  left as written. Raw 8-bit header bytes are read as UTF-8, else GB18030 (undecodable bytes
  become U+FFFD in what is parsed; the bytes sent are unchanged).
- Date and Message-ID are added when absent; ``To: undisclosed-recipients:;`` is added when there
  is no To and no Cc field (the header stays valid without revealing the envelope).
- Bounded in time (issue 13: the pickup runs this policy for every local user's message, and the
  header registry's parser is quadratic on some inputs: a 48 KB To: took 8–20 s). A field of at
  most MAX_ELEMENT (1,024) characters is parsed whole, as before; a longer one is cut at its
  top-level commas in one linear pass (`_units`) and each address is parsed on its own, in the
  context the whole field gives it, so the result is the same (a long field in which an encoded
  word could straddle a special character cannot be cut safely and counts as unparsable). Each
  field is parsed once. Refused (`DataError`, exit 65): an address field longer than 64 KiB,
  more than 256 KiB of address fields, an address or group name longer than 1,024 characters,
  more than 1,000 addresses in To/Cc/Bcc (with their Resent- forms; From has 1,000 of its own),
  and a message whose address parsing takes more than PARSE_BUDGET (0.5 s) of this thread's CPU
  time, checked between addresses ("header too complex to parse"). One message's header policy
  costs at most ~530 ms on this machine (the budget plus one address or short field, ≤ 25 ms;
  2-core AMD EPYC, Python 3.11, ``bench/run.py`` rows 6: the worst shape of each kind at the
  caps took 500–520 ms), against 80–110 ms for 1,000 ordinary recipients and under 1 ms for an
  ordinary 2 KB message.
"""

import bisect
import re
import time
from types import MappingProxyType, SimpleNamespace
from email import _header_value_parser as value_parser
from email import errors, policy as email_policy
from email.headerregistry import Address, Group
from email.utils import formatdate, make_msgid
from typing import BinaryIO, NamedTuple

from .pickup import MAX_RECIPIENTS
from .envelope import NO_RECIPIENTS, Envelope
from .errors import DataError, PolicyError, UsageError
from .i18n import _
from .reader import BodyInfo, HeaderField, MessageReader, recipient_fields, split_fields

# A longer display name (-F, a From: name) is cut: folding cannot break one long word, and even
# quoted with every character escaped, this many stay within the 998-octet line limit.
MAX_DISPLAY_NAME = 400

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# The header registry reports a bare local name ("root") with this defect; aliases resolve it.
_NO_DOMAIN = "addr-spec local part with no domain"


class HeaderPolicy(NamedTuple):
    sender: str  # Config.sender (the login)
    from_policy: str = "rewrite"  # or "reject"
    aliases: dict[str, str] = MappingProxyType({})  # Config.aliases
    local_hostname: str = ""  # this machine's host name, for user@<this host>
    full_name: str | None = None  # -F
    local_mail: str = "login"  # SMTP_LOCAL_MAIL: "login" or "refuse"

    @classmethod
    def from_config(cls, config, full_name: str | None = None) -> "HeaderPolicy":
        import socket

        return cls(sender=config.require_sender(), from_policy=config.from_policy,
                   aliases=config.aliases, local_hostname=socket.gethostname(), full_name=full_name,
                   local_mail=config.local_mail)

    def resolve(self, address: str) -> tuple[str, str | None]:
        """`local_rule` under this policy."""
        return local_rule(address, self.aliases, self.local_hostname,
                          self.sender if self.local_mail == "login" else None)


def prepare(
    header_block: bytes,
    *,
    extract_recipients: bool,
    argv_recipients: list[str],
    requested_sender: str | None,
    policy: HeaderPolicy,
    now: float | None = None,
) -> tuple[bytes, Envelope]:
    """Apply the header policy (module docstring) to a header block from `MessageReader`.

    Returns the new header block, which always ends with the empty line, and the envelope
    (eight_bit and size are left to `complete_envelope`). `argv_recipients` may be the raw
    argument words or the output of `parse_recipient_args`.
    """
    bounds = _Bounds()
    fields = split_fields(header_block)
    wanted = parse_recipient_args(argv_recipients, bounds)
    if extract_recipients:
        wanted += _header_recipients(fields, bounds)
    recipients, orig_to, local_names = _resolved(wanted, policy)
    if not recipients:
        raise UsageError(NO_RECIPIENTS)

    fields = [_qualify_locals(f, policy, bounds) if f.name in _VISIBLE_RECIPIENTS else f
              for f in fields if f.name not in ("bcc", "resent-bcc", "sender")]
    fields = [_original_to(name) for name, _rcpt, _rule in local_names] + fields
    fields, original_from = _apply_from_policy(fields, policy, bounds)
    names = {f.name for f in fields}
    if "date" not in names:
        date = formatdate(now, localtime=True)
        fields.append(HeaderField("date", f"Date: {date}\r\n".encode()))
    if "message-id" in names:
        message_id = _decode(next(f for f in fields if f.name == "message-id").value).strip()
    else:
        message_id = make_msgid(domain=_message_id_domain(policy))
        fields.append(HeaderField("message-id", f"Message-ID: {message_id}\r\n".encode()))
    if not names & {"to", "cc"}:
        fields.append(HeaderField("to", b"To: undisclosed-recipients:;\r\n"))

    envelope = Envelope(
        sender=policy.sender,
        recipients=recipients,
        requested_sender=requested_sender or original_from,
        smtputf8=not all(a.isascii() for a in [policy.sender, *recipients]),
        message_id=message_id,
        orig_to=orig_to or None,
        local_names=local_names or None,
    )
    return b"".join(f.raw for f in fields) + b"\r\n", envelope


def write(out: BinaryIO, reader: MessageReader, headers: bytes, envelope: Envelope) -> Envelope:
    """The new header block, then the rest of the input, to `out`; the completed envelope."""
    out.write(headers)
    return complete_envelope(envelope, headers, reader.copy_body(out))


def complete_envelope(envelope: Envelope, header_block: bytes, body: BodyInfo) -> Envelope:
    """The envelope with eight_bit and size of the final message (header block + body)."""
    return envelope._replace(
        eight_bit=body.eight_bit or not header_block.isascii(),
        size=len(header_block) + body.size,
    )


def parse_recipient_args(args: list[str], bounds: "_Bounds | None" = None) -> list[str]:
    """Command-line words → addr-specs: ``a@x,b@y`` in one word, ``Name <a@x>``, bare ``root``.
    `bounds`: the message's parsing bounds, when the words are part of one (`prepare`)."""
    bounds = _Bounds() if bounds is None else bounds
    addresses = []
    for arg in args:
        header = _address_header("to", arg, bounds, _("the command line"), recipients=False)
        if header is None:
            raise DataError(_("cannot parse recipient {address!r}").format(address=_shown_field(arg)))
        addresses += [a.addr_spec for a in header.addresses]
    return addresses


def resolve_local(address: str, aliases: dict[str, str], local_hostname: str, fallback: str | None = None) -> str:
    """A local name (``root``, ``user@<this host>``, ``user@localhost``) → its alias, else the
    ``default`` alias, else `fallback` (the login, under SMTP_LOCAL_MAIL=login); any other
    address unchanged. Never returns a bare name: DataError when a local name has no target."""
    return local_rule(address, aliases, local_hostname, fallback)[0]


# the rules of `local_rule`, in the words of the cleanup log line (log.local_line)
LOGIN_RULE = "no alias; SMTP_LOCAL_MAIL=login"


def local_rule(address: str, aliases: dict[str, str], local_hostname: str,
               fallback: str | None = None) -> tuple[str, str | None]:
    """`resolve_local`'s target and the rule that gave it: ``alias <name>``, ``alias default`` or
    LOGIN_RULE for a local name, None for an address that is not local (returned unchanged)."""
    local, at, domain = address.rpartition("@")
    if not at:
        local = address
    elif domain.lower() not in {"localhost", local_hostname.lower()} - {""}:
        return address, None
    name = local.lower()
    if local and aliases.get(name):
        return aliases[name], f"alias {name}"
    if local and aliases.get("default"):
        return aliases["default"], "alias default"
    if local and fallback:
        return fallback, LOGIN_RULE
    raise DataError(
        _("local recipient {address!r} has no alias").format(address=address),
        hint=_("set SMTP_ALIASES=name:address, e.g. SMTP_ALIASES={name}:you@example.com, or SMTP_LOCAL_MAIL=login "
               "to deliver such mail to the login").format(name=name),
    )


def _resolved(wanted: list[str], policy: HeaderPolicy) -> tuple[list[str], dict[str, str], list[list[str]]]:
    """The envelope recipients of the addresses `wanted` (local names resolved, IDNA applied,
    duplicates dropped case-insensitively), the local name each resolved recipient came from
    (the first, for orig_to=), and [name, recipient, rule] for each local name (once)."""
    recipients, orig_to, local_names = [], {}, []
    seen, names = set(), set()
    for address in wanted:
        target, rule = policy.resolve(address)
        rcpt = _envelope_address(target)
        if rule is not None and address.casefold() not in names:
            names.add(address.casefold())
            local_names.append([address, rcpt, rule])
        if rcpt.casefold() in seen:
            continue
        seen.add(rcpt.casefold())
        recipients.append(rcpt)
        if rule is not None:
            orig_to[rcpt] = address
    return recipients, orig_to, local_names


def _original_to(name: str) -> HeaderField:
    """``X-Original-To: <name>`` (Postfix's local delivery adds it): the local name a resolved
    recipient was given as. It came out of the address parser: one line, without CR or LF."""
    return HeaderField("x-original-to", f"X-Original-To: {_shown(name)[:MAX_DISPLAY_NAME]}\r\n".encode())


def _header_recipients(fields: list[HeaderField], bounds: "_Bounds") -> list[str]:
    addresses = []
    for f in recipient_fields(fields):
        text = _decode(f.value)
        header = _address_header(f.name, text, bounds, _label(f))
        if header is None:
            raise DataError(_("cannot parse the addresses in {header}: {text!r}").format(
                header=_label(f), text=_shown_field(text)))
        addresses += [a.addr_spec for a in header.addresses]
    return addresses


def _label(f: HeaderField) -> str:
    """The field's name as the message spells it."""
    return f.raw.partition(b":")[0].decode("ascii", "replace").strip()


_VISIBLE_RECIPIENTS = ("to", "cc", "resent-to", "resent-cc")


def _qualify_locals(f: HeaderField, policy: HeaderPolicy, bounds: "_Bounds") -> HeaderField:
    """The field with its local names replaced by their targets, each name kept as the display
    name of an address that has none; untouched when it names no local address, or one that
    does not resolve."""
    header = _address_header(f.name, _decode(f.value), bounds, _label(f))
    if header is None:
        return f
    try:
        resolved = {a.addr_spec: policy.resolve(a.addr_spec) for a in header.addresses}
    except DataError:
        return f
    if all(rule is None for _target, rule in resolved.values()):
        return f
    name = f.raw.partition(b":")[0].decode("ascii")

    def qualified(a):
        target, rule = resolved[a.addr_spec]
        username, _at, domain = target.rpartition("@")
        shown = a.display_name or (_shown(a.addr_spec)[:MAX_DISPLAY_NAME] if rule else "")
        return Address(shown, username, domain)

    groups = [Group(g.display_name, [qualified(a) for a in g.addresses]) for g in header.groups]
    pol = email_policy.SMTP if all(t.isascii() for t, _rule in resolved.values()) else email_policy.SMTPUTF8
    if len(header.pieces) == 1:  # a short field, parsed whole: folded whole, as it always was
        return HeaderField(f.name, pol.fold_binary(name, pol.header_factory(name, groups)))
    # a long one piece by piece (the registry would parse the whole text again): each address
    # and group name folded on its own, one to a line
    pieces = []
    for g in groups:
        if g.display_name is None:
            pieces += [_folded(name, pol, a, bounds) for a in g.addresses]
            continue
        members = [_folded(name, pol, a, bounds) for a in g.addresses]
        frame = _folded(name, pol, Group(g.display_name, []), bounds)[:-1]  # "name:;" without ";"
        pieces.append(b"\r\n ".join([frame, b",\r\n ".join(members) + b";"]) if members else frame + b";")
    return HeaderField(f.name, name.encode("ascii") + b": " + b",\r\n ".join(pieces) + b"\r\n")


def _folded(name: str, pol, item, bounds: "_Bounds") -> bytes:
    """One address (or group) as the registry writes it in a `name` field, folded, without the
    field name and the final CRLF."""
    bounds.check()
    folded = pol.fold_binary(name, pol.header_factory(name, item))
    return folded[len(name) + 1 : -2].lstrip(b" \r\n")  # the registry may fold right after "To:"


# ---------------------------------------------------------------------------------------------
# Bounded address parsing (issue 13). The header registry's parser is quadratic on some inputs
# (a 48 KB To: takes seconds), and the pickup runs it for every local user's message, so one
# user could stall everyone else's mail. A field up to MAX_ELEMENT characters is parsed whole, as
# it always was (ordinary mail); a longer one is cut by `_units` at its top-level commas in
# linear time and each piece is parsed on its own, in the context the whole-field parse gives it
# (so the result is the same), under the caps and the CPU budget of `_Bounds`.

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


class _Bounds(SimpleNamespace):
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


def _address_header(name: str, text: str, bounds: _Bounds, label: str, *, recipients: bool = True):
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


def _count(count: int, bounds: _Bounds, label: str, recipients: bool) -> None:
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


def _parse_units(name: str, units: list, bounds: _Bounds) -> _Addresses | None:
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


def _units(text: str, bounds: _Bounds, label: str) -> list:
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


def _encoded_word_crosses(text: str, bounds: _Bounds) -> bool:
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


def _comments(parsed: _Addresses, bounds: _Bounds) -> list[str]:
    """The comments of a parsed field, in order (`value_parser` keeps them; the registry drops them)."""
    comments = []
    for piece in parsed.pieces:
        bounds.check()
        comments += value_parser.get_address_list(piece)[0].comments
    return comments


def _shown_field(text: str) -> str:
    """A field's text as an error shows it: one line, at most 200 characters."""
    text = _shown(text)
    return text if len(text) <= 200 else text[:200] + "…"


def _apply_from_policy(
    fields: list[HeaderField], policy: HeaderPolicy, bounds: "_Bounds"
) -> tuple[list[HeaderField], str | None]:
    """From = the login (module docstring); returns the new fields and the original address."""
    from_fields = [f for f in fields if f.name == "from"]
    if not from_fields:
        return [*fields, _login_field(policy.full_name or "", policy.sender)], None
    text = _decode(from_fields[0].value)
    header = _address_header("from", text, bounds, _label(from_fields[0]), recipients=False)
    mailboxes = header.addresses if header else ()
    mailbox = mailboxes[0] if mailboxes else None
    original = mailbox.addr_spec if mailbox else None
    if len(from_fields) == 1 and len(mailboxes) == 1 and original.lower() == policy.sender.lower():
        return fields, original
    if policy.from_policy == "reject":
        raise PolicyError(
            _("From: {address} differs from the login {login}").format(
                address=original or _shown_field(text), login=policy.sender),
            hint="SMTP_FROM_POLICY=reject",
        )
    name = ""
    if mailbox:
        name = mailbox.display_name or " ".join(_comments(header, bounds))
    new = [_login_field(_shown(name) or policy.full_name or "", policy.sender)]
    if mailbox and mailbox.domain and not any(f.name == "reply-to" for f in fields):
        reply_to = _mailbox_field(
            "Reply-To", mailbox.display_name, mailbox.username, mailbox.domain
        )
        new.append(reply_to)
    first = fields.index(from_fields[0])
    rest = [f for f in fields if f.name != "from"]
    return rest[:first] + new + rest[first:], original


def _mailbox_field(name: str, display_name: str, username: str, domain: str) -> HeaderField:
    """One folded mailbox field; RFC 2047 for a non-ASCII name; CR/LF/NUL cannot get through."""
    # a non-ASCII address needs SMTPUTF8 anyway; SMTP would RFC 2047-encode the address itself
    pol = email_policy.SMTP if (username + domain).isascii() else email_policy.SMTPUTF8
    header = pol.header_factory(name, Address(_shown(display_name)[:MAX_DISPLAY_NAME], username, domain))
    return HeaderField(name.lower(), pol.fold_binary(name, header))


def _login_field(display_name: str, login: str) -> HeaderField:
    username, at, domain = login.rpartition("@")
    return _mailbox_field("From", display_name, username if at else login, domain)


def _decode(raw: bytes) -> str:
    """Raw header bytes → text: UTF-8, else GB18030 (see the shared notes on python-deps)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("gb18030", "replace")


def _shown(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _envelope_address(address: str) -> str:
    """IDNA-encode a non-ASCII domain when the local part is ASCII (then no SMTPUTF8 is needed)."""
    local, _at, domain = address.rpartition("@")
    if address.isascii() or not local.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        raise DataError(_("cannot IDNA-encode the domain of {address!r}").format(address=address)) from None


def _message_id_domain(policy: HeaderPolicy) -> str:
    at, domain = policy.sender.rpartition("@")[1:]
    domain = at and domain or policy.local_hostname or "localhost"
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"
