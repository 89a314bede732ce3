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
- Address fields are parsed once per message by `addresses.address_header`, bounded in time
  and size (issue 13; the caps, the CPU budget and what one message's policy costs at most are
  in that module's docstring).
"""

import re
from types import MappingProxyType
from email import policy as email_policy
from email.headerregistry import Address, Group
from email.utils import formatdate, make_msgid
from typing import BinaryIO, NamedTuple

from .addresses import Bounds, address_header, comments
from .envelope import NO_RECIPIENTS, Envelope
from .errors import DataError, PolicyError, UsageError
from .i18n import _
from .reader import BodyInfo, HeaderField, MessageReader, recipient_fields, split_fields

# A longer display name (-F, a From: name) is cut: folding cannot break one long word, and even
# quoted with every character escaped, this many stay within the 998-octet line limit.
MAX_DISPLAY_NAME = 400

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


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
    bounds = Bounds()
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


def rewrite_sender(header_block: bytes, policy: HeaderPolicy) -> bytes:
    """A queued message's header block with From = `policy`'s login, the display name kept and
    the address it had in Reply-To: (when it has none): the message moved to another account."""
    fields, _original = _apply_from_policy(split_fields(header_block), policy._replace(from_policy="rewrite"),
                                           Bounds())
    return b"".join(f.raw for f in fields) + b"\r\n"


def complete_envelope(envelope: Envelope, header_block: bytes, body: BodyInfo) -> Envelope:
    """The envelope with eight_bit and size of the final message (header block + body)."""
    return envelope._replace(
        eight_bit=body.eight_bit or not header_block.isascii(),
        size=len(header_block) + body.size,
    )


def parse_recipient_args(args: list[str], bounds: "Bounds | None" = None) -> list[str]:
    """Command-line words → addr-specs: ``a@x,b@y`` in one word, ``Name <a@x>``, bare ``root``.
    `bounds`: the message's parsing bounds, when the words are part of one (`prepare`)."""
    bounds = Bounds() if bounds is None else bounds
    addresses = []
    for arg in args:
        header = address_header("to", arg, bounds, _("the command line"), recipients=False)
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


def _header_recipients(fields: list[HeaderField], bounds: "Bounds") -> list[str]:
    addresses = []
    for f in recipient_fields(fields):
        text = _decode(f.value)
        header = address_header(f.name, text, bounds, _label(f))
        if header is None:
            raise DataError(_("cannot parse the addresses in {header}: {text!r}").format(
                header=_label(f), text=_shown_field(text)))
        addresses += [a.addr_spec for a in header.addresses]
    return addresses


def _label(f: HeaderField) -> str:
    """The field's name as the message spells it."""
    return f.raw.partition(b":")[0].decode("ascii", "replace").strip()


_VISIBLE_RECIPIENTS = ("to", "cc", "resent-to", "resent-cc")


def _qualify_locals(f: HeaderField, policy: HeaderPolicy, bounds: "Bounds") -> HeaderField:
    """The field with its local names replaced by their targets, each name kept as the display
    name of an address that has none; untouched when it names no local address, or one that
    does not resolve."""
    header = address_header(f.name, _decode(f.value), bounds, _label(f))
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


def _folded(name: str, pol, item, bounds: "Bounds") -> bytes:
    """One address (or group) as the registry writes it in a `name` field, folded, without the
    field name and the final CRLF."""
    bounds.check()
    folded = pol.fold_binary(name, pol.header_factory(name, item))
    return folded[len(name) + 1 : -2].lstrip(b" \r\n")  # the registry may fold right after "To:"


def _shown_field(text: str) -> str:
    """A field's text as an error shows it: one line, at most 200 characters."""
    text = _shown(text)
    return text if len(text) <= 200 else text[:200] + "…"


def _apply_from_policy(
    fields: list[HeaderField], policy: HeaderPolicy, bounds: "Bounds"
) -> tuple[list[HeaderField], str | None]:
    """From = the login (module docstring); returns the new fields and the original address."""
    from_fields = [f for f in fields if f.name == "from"]
    if not from_fields:
        return [*fields, _login_field(policy.full_name or "", policy.sender)], None
    text = _decode(from_fields[0].value)
    header = address_header("from", text, bounds, _label(from_fields[0]), recipients=False)
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
        name = mailbox.display_name or " ".join(comments(header, bounds))
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
