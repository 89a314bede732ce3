"""Postfix's pickup and cleanup: what a maildrop file asks for, and its way into the queue.

A maildrop file is the message (CRLF-normalised by `reader.MessageReader`) followed by a
one-line JSON trailer of request fields: ``recipients`` (command-line words, or the addresses
the front end already extracted), ``extract`` (``-t``: take the recipients from the header at
pickup), ``requested_sender`` (``-f``), ``full_name`` (``-F``) and the DSN wishes; the submission
service adds ``uid``, the submitter's (from SO_PEERCRED), which the pickup believes only in a file
of the spool's owner or root (`_submitter`). Two kinds of writer use it: the default ``-odb``
front end (`request`, then `queue.Spool.commit_request`), which leaves the header policy to the
pickup (as Postfix's sendmail leaves it to cleanup) so that the caller's wait holds no address
parsing, and the submission service (receiver.py, `parse_request`) for a caller who may not
write the queue.

The pickup (`pick_up` → `empty_maildrop`) trusts nothing of the file. Every entry of maildrop/
is looked at with lstat and handled in its own error boundary (`_pickup_one`): the trailer is
checked (`_check_drop`, a flat-token scan before json), the header policy runs over the message
as the front end would run it (`accept`), and only then is it queued. A malformed entry goes to
corrupt/ with its reason in corrupt-reasons/ (`note_refusal`). A well-formed request that the
policy refuses (no recipients, an unparseable address, From refused, a local name without alias
under SMTP_LOCAL_MAIL=refuse) raises `Rejected`, becomes a `Refusal`, and the submitting account
is told by mail (`_notify_refusal`, bounce.py), the caller having exited 0.

Only the -odb caller's `request` is on the start-up budget: everything else here is imported by
it too, so the module imports nothing the caller would not load anyway (queue, reader).
"""

import json
import os
import re
import stat
import time
from contextlib import suppress
from types import SimpleNamespace
from typing import BinaryIO, Callable, NamedTuple

from . import envelope as dsn
from . import fsio
from .envelope import Envelope
from .errors import CantCreate, DataError, Rejected, ShimError, UsageError
from .i18n import _
from .log import BOUNCE, PICKUP, one_line
from .queue import DROP_PATTERN, MAX_DROP_SIZE, MAX_TRAILER, Queue, Spool, crash_point
from .queued import QueuedMessage
from .reader import MessageReader, recipient_fields, split_fields

MAX_REASON = 1000  # characters of a refusal's reason kept for mailq and --show
# one JSON token: a string, a bracket, or a run of anything else (read by `_flat`, never searched)
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[][{}]|[^][{}"]+', re.S)
_DEPTH = {b"[": 1, b"{": 1, b"]": -1, b"}": -1}

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
        "requested_sender": opts.requested_sender, "full_name": opts.full_name,
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


def accept(config, fields: dict, data, out, uid: int = -1):
    """Pickup: validate the trailer `fields`, apply the header policy of the account the message
    picks (`accounts.prepare`, as user `uid` may) to `data` (the dropped message) and write the
    result to `out`; returns its envelope. Raises DataError for a malformed file, `Rejected` for a
    well-formed request the policy refuses."""
    from . import accounts, message

    problem = _malformed(fields)
    if problem:
        raise DataError(problem)
    reader = MessageReader(data, dot_ends=False, mbox_from=False)
    try:
        _account, headers, envelope = accounts.prepare(
            config, uid, reader.read_header_block(), fields.get("full_name"),
            extract_recipients=fields.get("extract") is True,
            argv_recipients=fields["recipients"], requested_sender=fields.get("requested_sender"),
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


# -- the runner's pickup step -------------------------------------------------------------------


def pick_up(config, queue: Queue, log, stats) -> list[str]:
    """Take in maildrop/; returns the ids of what it queued: messages, and notices for refused
    requests. A pickup that fails as a whole (maildrop/ not a directory…) is logged: what is
    queued already is delivered all the same."""
    try:
        result = empty_maildrop(queue, lambda fields, data, out, uid: accept(config, fields, data, out, uid))
    except OSError as exc:
        log.error(PICKUP, f"maildrop not picked up: {exc}")
        return []
    for message in result.accepted:
        env = message.envelope
        log.received(message.id, uid=message.uid, sender=env.requested_sender or env.sender, message_id=env.message_id,
                     local_names=env.local_names)
    refusals = {refusal.id: refusal for refusal in result.refusals}
    for name, uid, reason in result.rejected:  # any name: the log quotes it as a token
        match = DROP_PATTERN.match(name)
        refusal = refusals.get(match.group(1)) if match else None
        if refusal:  # the header policy refused it: Postfix's pickup line, then cleanup's reject
            log.picked_up(refusal.id, uid=uid, sender=refusal.requested_sender or config.sender)
            log.rejected(refusal.id, reason=reason, sender=config.sender)
        else:
            log.warning(PICKUP, f"maildrop/{name} of uid {uid} refused: {reason}")
    for name, reason in result.left:
        log.warning(PICKUP, f"maildrop/{name} left for the next run: {reason}")
    stats.picked_up += len(result.accepted)
    stats.refused_drops += len(result.rejected)
    notices = [n for n in (_notify_refusal(config, queue, log, refusal) for refusal in result.refusals) if n]
    stats.bounces += len(notices)
    return [message.id for message in result.accepted] + notices


def _notify_refusal(config, queue: Queue, log, refusal: "Refusal") -> str | None:
    """Tell the submitter that its request was refused at pickup, from what the pickup read (the
    file kept in corrupt/ is its writer's to change); None when the notice cannot be queued, which
    is logged: a notice must not cost other users their delivery."""
    from .bounce import queue_report  # the failure reports' one home

    try:
        return queue_report(config, queue, log, about=refusal.id, original=refusal.headers,
                            arrival=refusal.arrival, requested_sender=refusal.requested_sender,
                            uid=refusal.uid, refusal=refusal.reason)
    except Exception as exc:
        log.error(BOUNCE, f"cannot queue the notice about {refusal.id}: {type(exc).__name__}: {exc}")
        return None


# -- the maildrop, emptied ----------------------------------------------------------------------


class Refusal(NamedTuple):
    """A well-formed request the header policy refused at pickup, with what its notice needs, read
    through the descriptor the pickup held: the file kept in corrupt/ is its writer's to change."""

    id: str
    reason: str
    headers: bytes  # the original header block (`bounce.header_block`)
    requested_sender: str | None
    arrival: float
    uid: int  # the submitter


class PickupResult(SimpleNamespace):
    """What `empty_maildrop` did: ``accepted`` messages; ``rejected`` entries as (name, uid, reason);
    ``refusals`` (`Refusal`), those of them that were well-formed requests the header policy
    refused and that are kept in corrupt/; ``left`` entries as (name, reason), left in maildrop/
    for the next run because our own disk failed."""

    def __init__(self):
        super().__init__(accepted=[], rejected=[], refusals=[], left=[])


def note_refusal(queue: Queue, name: str, reason: str) -> None:
    """Record why entry `name` of corrupt/ was refused, for mailq and --show. Best effort: a
    refusal stands without it (mailq then says the reason is unknown)."""
    with suppress(OSError):
        owner = queue.owner()
        fsio.mkdir(queue.reasons, 0o700, *owner)
        with fsio.opened(queue.reasons) as reasons:
            fsio.remove_entry(reasons, name)  # an earlier entry's, or anything planted there
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=reasons)
            try:
                if os.geteuid() == 0 and owner != (0, 0):
                    os.fchown(fd, *owner)
                os.write(fd, one_line(reason)[:MAX_REASON].encode("utf-8", "replace"))
            finally:
                os.close(fd)


def empty_maildrop(queue: Queue, accept: Callable[[dict, BinaryIO, BinaryIO], Envelope]) -> PickupResult:
    """Move valid maildrop files into queue/, refused ones into corrupt/.

    ``accept(fields, data, out, uid)`` gets the dropped trailer's fields, the dropped message (a
    stream of exactly the declared size) and the submitting user; it writes the message to
    trust to `out` and returns its envelope, or raises ShimError to refuse it.
    """
    result = PickupResult()
    try:
        with queue.maildrop_lock() as maildrop:
            for name in sorted(os.listdir(maildrop)):  # all of them: maildrop/ must end up empty
                _pickup_one(queue, maildrop, name, accept, result)
    except (FileNotFoundError, PermissionError):
        pass  # no maildrop/ here, or not ours to read
    return result


def _pickup_one(queue: Queue, maildrop: int, name: str, accept, result: PickupResult) -> None:
    """One entry, in its own error boundary: it is queued, or quarantined in corrupt/, or
    (when our own disk fails) left for the next run; either way the pickup goes on."""
    try:
        _take(queue, maildrop, name, accept, result)
    except CantCreate as exc:  # our disk, not their file
        result.left.append((name, str(exc)))
    except Exception as exc:  # an entry nobody foresaw must not stop every later run
        _refuse(queue, maildrop, name, fsio.owner_of(maildrop, name), f"cannot pick it up: {type(exc).__name__}",
                result)


def _take(queue: Queue, maildrop: int, name: str, accept, result: PickupResult) -> None:
    """Look at the entry with lstat before opening it (a directory, FIFO, socket or link is
    never opened), then check the file actually opened, which may have been swapped."""
    try:
        problem = _odd_drop(os.stat(name, dir_fd=maildrop, follow_symlinks=False), name)
    except FileNotFoundError:
        return
    if problem:
        _refuse(queue, maildrop, name, fsio.owner_of(maildrop, name), problem, result)
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=maildrop)
    except FileNotFoundError:
        return
    except OSError as exc:
        _refuse(queue, maildrop, name, fsio.owner_of(maildrop, name), f"cannot open: {exc.strerror}", result)
        return
    st = os.fstat(fd)
    problem = _odd_drop(st, name)
    if problem:
        os.close(fd)
        _refuse(queue, maildrop, name, st.st_uid, problem, result)
        return
    msg_id = DROP_PATTERN.match(name).group(1)
    with open(fd, "rb") as source:
        if _exists(queue, msg_id):
            os.unlink(name, dir_fd=maildrop)  # already picked up by a runner that died before removing it
            os.fsync(maildrop)
            return
        message = _queue_drop(queue, maildrop, name, msg_id, source, st, accept, result)
    if message is None:
        return
    crash_point("pickup-committed")
    os.unlink(name, dir_fd=maildrop)
    os.fsync(maildrop)
    result.accepted.append(message)


def _queue_drop(queue: Queue, maildrop: int, name: str, msg_id: str, source: BinaryIO, st: os.stat_result, accept,
                result: PickupResult) -> QueuedMessage | None:
    """The drop checked, accepted and committed to queue/; None when it is refused."""
    uid = st.st_uid
    try:
        fields, size = _check_drop(source, st)
        uid = _submitter(queue, fields, st)
        # a pickup that died half-way (we hold the pickup lock: nobody else writes it)
        fsio.rmtree(os.path.join(queue.tmp, msg_id))
        with Spool(queue, False, msg_id) as spool:
            envelope = accept(fields, _Bounded(source, size), spool.file, uid)
            spool.commit(envelope, uid=uid, arrival=_arrival(st), drop=name)
        return spool.message
    except CantCreate:
        raise  # our disk, not their file: `_pickup_one` leaves it for the next run
    except Rejected as exc:
        refusal = Refusal(msg_id, str(exc), _original_headers(source, size), fields.get("requested_sender"),
                          _arrival(st), uid)
        if _refuse(queue, maildrop, name, uid, str(exc), result):
            result.refusals.append(refusal)
    except ShimError as exc:
        _refuse(queue, maildrop, name, uid, str(exc), result)
    return None


def _submitter(queue: Queue, fields: dict, st: os.stat_result) -> int:
    """Whom the message is from: the trailer's "uid" in a file of the spool's owner (the
    submission service, which has it from SO_PEERCRED) or of root; else the file's owner,
    whatever its trailer claims."""
    if st.st_uid not in (0, queue.owner()[0]):
        return st.st_uid
    uid = fields.get("uid", st.st_uid)
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 1 << 32:
        raise DataError("the trailer's uid is not a uid")
    return uid


def _exists(queue: Queue, msg_id: str) -> bool:
    return any(os.path.lexists(os.path.join(d, msg_id)) for d in (queue.queue, queue.failed))


def _refuse(queue: Queue, maildrop: int, name: str, uid: int, reason: str, result: PickupResult) -> bool:
    """Move a refused entry to corrupt/ (under a new name when its own is taken there);
    whether it is there now. When it cannot be moved it is logged, and the next run refuses
    it again (its notice waits for that: nobody is told twice)."""
    try:
        with fsio.opened(queue.corrupt) as corrupt:
            kept = fsio.free_name(corrupt, name)
            os.rename(name, kept, src_dir_fd=maildrop, dst_dir_fd=corrupt)
        moved = True
        note_refusal(queue, kept, reason)
    except OSError as exc:  # e.g. a directory some user made there, which we may not move
        if fsio.owner_of(maildrop, name) < 0:
            return False  # gone meanwhile
        reason += f"; cannot move it to {queue.corrupt}: {exc.strerror}"
        moved = False
    result.rejected.append((name, uid, reason))
    return moved


def _odd_drop(st: os.stat_result, name: str) -> str | None:
    """What makes entry `name` of maildrop/ no maildrop file, or None."""
    if not DROP_PATTERN.match(name):
        return "not a maildrop file name"
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return "not a plain file"
    if st.st_size > MAX_DROP_SIZE + MAX_TRAILER:
        return f"larger than {MAX_DROP_SIZE} bytes"
    return None


def _check_drop(source: BinaryIO, st: os.stat_result) -> tuple[dict, int]:
    """The trailer of a dropped file that `_odd_drop` let through: (fields, message size) or
    DataError."""
    tail_size = min(st.st_size, MAX_TRAILER)
    source.seek(st.st_size - tail_size)
    tail = source.read(tail_size)
    start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
    if not tail.endswith(b"\n") or (start == 0 and tail_size == MAX_TRAILER):
        raise DataError("no trailer")
    fields = _trailer(tail[start:])
    if fields.get("version") != 1:
        raise DataError("unknown trailer version")
    size = fields.get("size")
    if not isinstance(size, int) or size != st.st_size - (len(tail) - start) or size > MAX_DROP_SIZE:
        raise DataError("trailer size does not match the file")
    source.seek(0)
    return fields, size


def _trailer(line: bytes) -> dict:
    """A trailer's fields: a flat JSON object whose values are strings, integers, booleans, null
    or lists of strings. Its depth is checked first, without recursion: json.loads recurses once
    per level, and ten thousand ``[`` would end in a RecursionError on every run."""
    if not _flat(line):
        raise DataError("not a flat trailer")
    try:
        fields = json.loads(line)
    except ValueError:
        raise DataError("unreadable trailer") from None
    if not isinstance(fields, dict) or not all(map(_plain_value, fields.values())):
        raise DataError("not a flat trailer")
    return fields


def _flat(line: bytes) -> bool:
    """No more than two levels of brackets outside strings (an object, a list in it), token by
    token from the start: a string that does not end stops the scan instead of being searched
    for again from each of its quotes."""
    depth = pos = 0
    while pos < len(line):
        token = _TOKEN.match(line, pos)
        if token is None:
            return False
        pos = token.end()
        depth += _DEPTH.get(token.group(), 0)
        if depth > 2:
            return False
    return True


def _plain_value(value) -> bool:
    return (value is None or isinstance(value, (str, int))  # bool is an int
            or isinstance(value, list) and all(isinstance(item, str) for item in value))


def _arrival(st: os.stat_result) -> float:
    """A dropped message's arrival: when its file was renamed into maildrop/ (not in the future)."""
    return min(st.st_ctime, time.time())


def _original_headers(source: BinaryIO, size: int) -> bytes:
    """The header block of a dropped message, for the notice of its refusal."""
    from .bounce import MAX_ORIGINAL_HEADERS, header_block

    source.seek(0)
    return header_block(source.read(min(size, MAX_ORIGINAL_HEADERS + 4)))


class _Bounded:
    """A read-only view of the first `size` bytes of a file (the dropper may still append)."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream = stream
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._stream.read(n) if n else b""
        self._left -= len(data)
        return data

    def isatty(self) -> bool:
        return False
