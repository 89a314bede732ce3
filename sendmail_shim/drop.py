"""What a maildrop file asks for, and its pickup into the queue.

A maildrop file is the message (CRLF-normalised by `reader.MessageReader`) followed by a
one-line JSON trailer of request fields: ``recipients`` (command-line words, or the addresses
the front end already extracted), ``extract`` (``-t``: take the recipients from the header at
pickup), ``requested_sender`` (``-f``), ``full_name`` (``-F``) and the DSN wishes; the submission
service adds ``uid``, the submitter's (from SO_PEERCRED), which the pickup believes only in a file
of the spool's owner or root (`Queue._submitter`). Two kinds of
writer use it: a caller that cannot read the password (its message is picked up by the queue
runner), and the default ``-odb`` front end, which leaves the header policy to the pickup (as
Postfix's sendmail leaves it to cleanup) so that the caller's wait holds no address parsing.

The pickup (`accept`) trusts nothing of the file: the trailer is checked, the header policy runs
over the message as the front end would run it, and only then is it queued. A well-formed
request that the policy refuses (no recipients, an unparseable address, From refused, a local
name without alias under SMTP_LOCAL_MAIL=refuse) raises `Rejected`: the submitting account is told by mail (bounce.py), the
caller having exited 0.
"""

from . import envelope as dsn
from .errors import DataError, Rejected, ShimError, UsageError
from .i18n import _
from .reader import MessageReader, recipient_fields, split_fields

MAX_RECIPIENTS = 1000
MAX_ADDRESS = 320  # RFC 5321's 64 + 1 + 255, with room for a display name on the command line
MAX_FULL_NAME = 1000  # -F; the header policy shortens it further


def request(opts, header_block: bytes) -> dict:
    """The trailer fields for `opts` (the command line). Refuses here, with the caller's exit
    status, what the pickup would refuse as malformed, and a message that names no recipient at
    all; what only the header policy can find out is left to the pickup."""
    if not opts.recipients and not (opts.extract_recipients and recipient_fields(split_fields(header_block))):
        raise UsageError(dsn.NO_RECIPIENTS)
    fields = {
        "recipients": list(opts.recipients), "extract": opts.extract_recipients,
        "requested_sender": opts.sender, "full_name": opts.full_name,
        "dsn_notify": opts.dsn_notify, "dsn_ret": opts.dsn_ret, "envid": opts.envid,
    }
    problem = _malformed(fields)
    if problem:
        raise DataError(problem)
    return fields


REQUEST_KEYS = ("recipients", "extract", "requested_sender", "full_name", "dsn_notify", "dsn_ret", "envid")


def parse_request(line: bytes) -> dict:
    """A request line sent to the submission service (receiver.py): a flat JSON object of
    REQUEST_KEYS, checked as `request` builds it. Raises DataError."""
    import json

    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a request nested thousands deep
        raise DataError(_("the submission request is not readable")) from None
    if not isinstance(fields, dict) or not set(fields) <= set(REQUEST_KEYS):
        raise DataError(_("the submission request is not readable"))
    problem = _malformed(fields)
    if problem:
        raise DataError(problem)
    return fields


def accept(config, fields: dict, data, out):
    """Pickup: validate the trailer `fields`, apply the header policy to `data` (the dropped
    message) and write the result to `out`; returns its envelope. Raises DataError for a
    malformed file, `Rejected` for a well-formed request the policy refuses."""
    from . import message

    problem = _malformed(fields)
    if problem:
        raise DataError(problem)
    reader = MessageReader(data, dot_ends=False, mbox_from=False)
    try:
        headers, envelope = message.prepare(
            reader.read_header_block(), extract_recipients=fields.get("extract") is True,
            argv_recipients=fields["recipients"], requested_sender=fields.get("requested_sender"),
            policy=message.HeaderPolicy.from_config(config, fields.get("full_name")),
        )
    except ShimError as exc:
        raise Rejected(str(exc)) from None
    envelope = message.write(out, reader, headers, envelope)
    return envelope._replace(**{
        key: fields.get(key) and validate(fields[key])
        for key, validate in (("dsn_notify", dsn.dsn_notify), ("dsn_ret", dsn.dsn_ret), ("envid", dsn.envid))
    })


def _malformed(fields: dict) -> str | None:
    """What is structurally wrong with trailer fields, or None."""
    recipients = fields.get("recipients")
    extract = fields.get("extract", False)
    if (not isinstance(recipients, list) or len(recipients) > MAX_RECIPIENTS or not isinstance(extract, bool)
            or not (recipients or extract) or not all(_text(r, MAX_ADDRESS) for r in recipients)):
        return _("more than {most} recipients, or one that is too long or contains control characters").format(
            most=MAX_RECIPIENTS)
    for key, option, limit in (("requested_sender", "-f", MAX_ADDRESS), ("full_name", "-F", MAX_FULL_NAME)):
        value = fields.get(key)  # only logged or shown: their users clean them
        if value is not None and not (isinstance(value, str) and len(value) <= limit):
            return _("{option} is too long").format(option=option)
    for key, validate in (("dsn_notify", dsn.dsn_notify), ("dsn_ret", dsn.dsn_ret), ("envid", dsn.envid)):
        value = fields.get(key)
        if value is not None and not (_text(value, 100) and validate(value)):
            return _("{field} is not a valid DSN parameter").format(field=key)
    return None


def _text(value, limit: int) -> bool:
    return isinstance(value, str) and value.isprintable() and len(value) <= limit
