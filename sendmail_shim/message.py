"""The header policy (`prepare`) for a message read by `reader.MessageReader`.

It works on the header block as bytes: fields are split at byte level and dropped or replaced
whole; every other field passes byte-for-byte (no re-serialisation, python-deps.md §5.2).

- Recipients: command-line recipients first, then with ``-t`` the To/Cc/Bcc fields (all of them),
  or Resent-To/-Cc/-Bcc when any Resent- field is present. Addresses are parsed with the header
  registry under ``policy.SMTP``; any defect other than obsolete syntax, a non-ASCII local part or
  a bare local name (which the alias map resolves) is an error. Local names and ``user@<this
  host>``/``user@localhost`` go through the alias map; duplicates are dropped case-insensitively.
  A To/Cc (or Resent-To/-Cc) field naming such a local address is rewritten with its alias (as
  Postfix qualifies local names in headers), so the relay never sees ``To: root``; a local name
  without an alias leaves the field as written.
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
"""

import re
from types import MappingProxyType
from email import _header_value_parser as value_parser
from email import errors, policy as email_policy
from email.headerregistry import Address, Group
from email.utils import formatdate, make_msgid
from typing import BinaryIO, NamedTuple

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

    @classmethod
    def from_config(cls, config, full_name: str | None = None) -> "HeaderPolicy":
        import socket

        return cls(sender=config.require_sender(), from_policy=config.from_policy,
                   aliases=config.aliases, local_hostname=socket.gethostname(), full_name=full_name)


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
    fields = split_fields(header_block)
    wanted = parse_recipient_args(argv_recipients)
    if extract_recipients:
        wanted += _header_recipients(fields)
    recipients = _dedupe(
        _envelope_address(resolve_local(address, policy.aliases, policy.local_hostname))
        for address in wanted
    )
    if not recipients:
        raise UsageError(NO_RECIPIENTS)

    fields = [_qualify_locals(f, policy) if f.name in _VISIBLE_RECIPIENTS else f
              for f in fields if f.name not in ("bcc", "resent-bcc", "sender")]
    fields, original_from = _apply_from_policy(fields, policy)
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


def parse_recipient_args(args: list[str]) -> list[str]:
    """Command-line words → addr-specs: ``a@x,b@y`` in one word, ``Name <a@x>``, bare ``root``."""
    addresses = []
    for arg in args:
        header = _address_header("to", arg)
        if header is None:
            raise DataError(_("cannot parse recipient {address!r}").format(address=_shown(arg)))
        addresses += [a.addr_spec for a in header.addresses]
    return addresses


def resolve_local(address: str, aliases: dict[str, str], local_hostname: str) -> str:
    """A local name (``root``, ``user@<this host>``, ``user@localhost``) → its alias or the
    ``default`` alias; any other address unchanged. Never returns a bare name."""
    local, at, domain = address.rpartition("@")
    if not at:
        local = address
    elif domain.lower() not in {"localhost", local_hostname.lower()} - {""}:
        return address
    target = aliases.get(local.lower()) or aliases.get("default")
    if not local or not target:
        raise DataError(
            _("local recipient {address!r} has no alias").format(address=address),
            hint=_("set SMTP_ALIASES=name:address, e.g. SMTP_ALIASES={name}:you@example.com").format(name=local.lower()),
        )
    return target


def _header_recipients(fields: list[HeaderField]) -> list[str]:
    addresses = []
    for f in recipient_fields(fields):
        text = _decode(f.value)
        header = _address_header(f.name, text)
        if header is None:
            label = f.raw.partition(b":")[0].decode("ascii", "replace")
            raise DataError(_("cannot parse the addresses in {header}: {text!r}").format(header=label, text=_shown(text)))
        addresses += [a.addr_spec for a in header.addresses]
    return addresses


_VISIBLE_RECIPIENTS = ("to", "cc", "resent-to", "resent-cc")


def _qualify_locals(f: HeaderField, policy: HeaderPolicy) -> HeaderField:
    """The field with its local names replaced by their aliases; untouched when it has none."""
    header = _address_header(f.name, _decode(f.value))
    if header is None:
        return f
    try:
        resolved = {a.addr_spec: resolve_local(a.addr_spec, policy.aliases, policy.local_hostname)
                    for a in header.addresses}
    except DataError:
        return f
    if all(old == new for old, new in resolved.items()):
        return f
    name = f.raw.partition(b":")[0].decode("ascii")

    def qualified(a):
        username, _at, domain = resolved[a.addr_spec].rpartition("@")
        return Address(a.display_name, username, domain)

    groups = [Group(g.display_name, [qualified(a) for a in g.addresses]) for g in header.groups]
    pol = email_policy.SMTP if all(v.isascii() for v in resolved.values()) else email_policy.SMTPUTF8
    return HeaderField(f.name, pol.fold_binary(name, pol.header_factory(name, groups)))


def _address_header(name: str, text: str):
    """`text` parsed as an address field under policy.SMTP; None if it has a real defect."""
    try:
        header = email_policy.SMTP.header_factory(name, text)
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


def _apply_from_policy(
    fields: list[HeaderField], policy: HeaderPolicy
) -> tuple[list[HeaderField], str | None]:
    """From = the login (module docstring); returns the new fields and the original address."""
    from_fields = [f for f in fields if f.name == "from"]
    if not from_fields:
        return [*fields, _login_field(policy.full_name or "", policy.sender)], None
    text = _decode(from_fields[0].value)
    header = _address_header("from", text)
    mailboxes = header.addresses if header else ()
    mailbox = mailboxes[0] if mailboxes else None
    original = mailbox.addr_spec if mailbox else None
    if len(from_fields) == 1 and len(mailboxes) == 1 and original.lower() == policy.sender.lower():
        return fields, original
    if policy.from_policy == "reject":
        raise PolicyError(
            _("From: {address} differs from the login {login}").format(address=original or _shown(text), login=policy.sender),
            hint="SMTP_FROM_POLICY=reject",
        )
    name = ""
    if mailbox:
        name = mailbox.display_name or " ".join(value_parser.get_address_list(text)[0].comments)
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
    """Raw header bytes → text: UTF-8, else GB18030 (python-deps.md §5.1)."""
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


def _dedupe(addresses) -> list[str]:
    seen, result = set(), []
    for address in addresses:
        if address.casefold() not in seen:
            seen.add(address.casefold())
            result.append(address)
    return result


def _message_id_domain(policy: HeaderPolicy) -> str:
    at, domain = policy.sender.rpartition("@")[1:]
    domain = at and domain or policy.local_hostname or "localhost"
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"
