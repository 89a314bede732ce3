"""The durable queue on disk: atomic commit, crash leftovers, permissions, maildrop validation,
listing and administration, bounce layout. Delivery itself is in test_runner.py."""

import email
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sendmail_shim import bounce, config as config_module, postsuper
from sendmail_shim.envelope import Envelope
from sendmail_shim.errors import CantCreate, DataError, UsageError
from sendmail_shim.queue import DROP_PATTERN, Queue, new_id
from sendmail_shim.queued import QueuedMessage, Recipient
from sendmail_shim.pickup import accept as accept_drop, empty_maildrop
from sendmail_shim.postsuper import CorruptItem, format_listing

ROOT = Path(__file__).resolve().parent.parent
LOGIN = "alice@163.test"
MESSAGE = (b"From: Alice <alice@163.test>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
           b"Date: Mon, 25 Nov 2024 13:00:00 +0000\r\nMessage-ID: <m1@163.test>\r\n\r\nbody\r\n.leading dot\r\n")

# Runs in a subprocess: queue one message (stdin) for argv recipients, with the crash variable set.
SUBMIT = r"""
import sys
from sendmail_shim.envelope import Envelope
from sendmail_shim.queue import Queue
queue = Queue(sys.argv[1])
queue.ensure()
data = sys.stdin.buffer.read()
with queue.spool(drop=sys.argv[2] == "drop") as spool:
    spool.file.write(data[:10])
    spool.file.flush()
    spool.file.write(data[10:])
    if spool.drop:
        print(spool.commit_request({"recipients": sys.argv[3:]}))
    else:
        print(spool.commit(Envelope(sender="alice@163.test", recipients=sys.argv[3:], size=len(data))))
"""


def envelope(*recipients, **fields) -> Envelope:
    return Envelope(sender=LOGIN, recipients=list(recipients or ["bob@example.org"]), size=len(MESSAGE), **fields)


def enqueue(queue: Queue, data: bytes = MESSAGE, *recipients, **commit) -> str:
    with queue.spool() as spool:
        spool.file.write(data)
        return spool.commit(envelope(*recipients), **commit)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def queue(tmp_path) -> Queue:
    q = Queue(str(tmp_path / "spool"))
    q.ensure()
    return q


def test_commit_makes_one_complete_message_with_private_modes(queue, tmp_path):
    old = os.umask(0)  # a careless caller's umask must not loosen anything
    try:
        msg_id = enqueue(queue)
    finally:
        os.umask(old)
    root = Path(queue.root)
    assert tree(root) == ["corrupt", "failed", "maildrop", "maildrop-tmp", "queue", f"queue/{msg_id}",
                          f"queue/{msg_id}/data", f"queue/{msg_id}/envelope.json", "tmp"]
    assert {p.name: mode(p) for p in root.iterdir()} == dict.fromkeys(
        ["corrupt", "failed", "maildrop", "maildrop-tmp", "queue", "tmp"], 0o700)
    assert mode(root) == 0o700
    assert mode(root / "queue" / msg_id) == 0o700
    assert mode(root / "queue" / msg_id / "data") == 0o600
    assert mode(root / "queue" / msg_id / "envelope.json") == 0o600
    assert (root / "queue" / msg_id / "data").read_bytes() == MESSAGE
    message = queue.load(msg_id)
    assert message.envelope.recipients == ["bob@example.org"]
    assert [(r.address, r.state) for r in message.recipients] == [("bob@example.org", "deferred")]
    assert message.uid == os.getuid() and message.attempts == 0 and not message.bounce
    assert message.next_attempt == message.arrival


def test_a_spool_open_to_others_lets_nobody_else_write(tmp_path):
    """Other users hand their mail to the submission service; nothing in the spool is theirs."""
    root = tmp_path / "spool"
    root.mkdir()
    root.chmod(0o711)  # as tmpfiles.d creates the system spool
    Queue(str(root)).ensure()
    assert {p.name: mode(p) for p in root.iterdir()} == {
        "tmp": 0o700, "queue": 0o700, "failed": 0o700, "corrupt": 0o700, "maildrop": 0o700, "maildrop-tmp": 0o700}


def test_leaving_the_spool_without_commit_leaves_nothing(queue):
    with pytest.raises(RuntimeError):
        with queue.spool() as spool:
            spool.file.write(MESSAGE)
            raise RuntimeError("the caller's input broke")
    with queue.spool(drop=True) as spool:
        spool.file.write(MESSAGE)
    assert all(not os.listdir(os.path.join(queue.root, d)) for d in os.listdir(queue.root))


def test_ids_are_unique_and_sort_by_arrival():
    ids = [new_id(1_700_000_000 + i) for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(len(i) == 16 for i in ids)


def test_an_envelope_written_by_an_older_version_loads_in_todays_words(queue):
    """Older versions said pending and failed; the queue says deferred and bounced (HACKING.md, "Words")."""
    msg_id = enqueue(queue, MESSAGE, "bob@example.org", "carol@example.org", "dave@example.org")
    path = Path(queue.queue, msg_id, "envelope.json")
    stored = json.loads(path.read_text())
    for rcpt, old in zip(stored["recipients"], ("pending", "failed", "sent"), strict=True):
        rcpt["state"] = old
    path.write_text(json.dumps(stored))
    message = queue.load(msg_id)
    assert [r.state for r in message.recipients] == ["deferred", "bounced", "sent"]
    assert [r.address for r in message.deferred] == ["bob@example.org"]
    with queue.lock(msg_id) as locked:
        queue.save(locked)
    assert [r["state"] for r in json.loads(path.read_text())["recipients"]] == ["deferred", "bounced", "sent"]


@pytest.mark.parametrize("drop", [False, True], ids=["queue", "maildrop"])
@pytest.mark.parametrize("step, kept", [
    ("spool-written", False), ("spool-synced", False), ("spool-committed", True),
])
def test_sigkill_while_queueing_leaves_nothing_or_the_whole_message(tmp_path, step, kept, drop):
    queue = Queue(str(tmp_path / "spool"))
    proc = subprocess.run(
        [sys.executable, "-c", SUBMIT, queue.root, "drop" if drop else "queue", "bob@example.org"],
        input=MESSAGE, capture_output=True, cwd=ROOT, env={**os.environ, "SENDMAIL_SHIM_TEST_CRASH": step},
    )
    assert proc.returncode == -signal.SIGKILL
    half_written = tree(Path(queue.tmp)) + tree(Path(queue.droptmp))
    assert bool(half_written) == (not kept)
    queue.clean_tmp(grace=0)
    leftovers = tree(Path(queue.tmp)) + tree(Path(queue.droptmp))
    assert leftovers == []
    if drop:
        dropped = os.listdir(queue.maildrop)
        assert len(dropped) == (1 if kept else 0)
        if kept:
            assert Path(queue.maildrop, dropped[0]).read_bytes().startswith(MESSAGE)
    else:
        assert len(queue.ids()) == (1 if kept else 0)
        if kept:
            message = queue.load(queue.ids()[0])
            assert Path(message.data_path).read_bytes() == MESSAGE
            assert message.envelope.recipients == ["bob@example.org"]


def test_clean_tmp_spares_a_message_being_written(queue):
    with queue.spool() as spool:
        spool.file.write(MESSAGE)
        assert queue.clean_tmp(grace=0) == []  # locked by its writer
        spool.commit(envelope())
    assert len(queue.ids()) == 1


def test_clean_tmp_removes_an_unlocked_leftover(queue):
    leftover = Path(queue.tmp, new_id())
    leftover.mkdir()
    (leftover / "data").write_bytes(MESSAGE[:7])
    assert queue.clean_tmp(grace=3600) == []  # too young: its writer may be about to lock it
    assert queue.clean_tmp(grace=0) == [leftover.name]
    assert not leftover.exists()


def test_clean_tmp_removes_a_planted_fifo_and_symlink_without_hanging(queue, tmp_path):
    """Anyone may create entries in maildrop-tmp/ (3733): a FIFO there must not block the
    runner's open forever (no mail would ever be delivered again)."""
    fifo = Path(queue.droptmp, "planted-fifo")
    os.mkfifo(fifo)
    link = Path(queue.droptmp, "planted-link")
    link.symlink_to(tmp_path / "elsewhere")
    old = time.time() - 3600
    for entry in (fifo, link):
        os.utime(entry, (old, old), follow_symlinks=False)
    code = "import sys; from sendmail_shim.queue import Queue; print(sorted(Queue(sys.argv[1]).clean_tmp()))"
    proc = subprocess.run([sys.executable, "-c", code, queue.root], capture_output=True, text=True,
                          cwd=ROOT, timeout=20)
    assert proc.stdout.strip() == "['planted-fifo', 'planted-link']", proc.stderr
    assert os.listdir(queue.droptmp) == []


# -- maildrop ----------------------------------------------------------------------------------


def drop(queue: Queue, data: bytes = MESSAGE, *recipients, **fields) -> str:
    with queue.spool(drop=True) as spool:
        spool.file.write(data)
        return spool.commit_request(dict(fields, recipients=list(recipients or ["bob@example.org"])))


def pickup(queue: Queue):
    cfg = config_module.build({"SMTP_HOST": "127.0.0.1", "SMTP_USER": LOGIN}, os.environ)
    return empty_maildrop(queue, lambda fields, data, out, uid: accept_drop(cfg, fields, data, out, uid))


def test_a_dropped_message_is_one_file_then_picked_up_under_its_id(queue):
    msg_id = drop(queue, MESSAGE, "bob@example.org", requested_sender="www-data")
    (name,) = os.listdir(queue.maildrop)
    assert DROP_PATTERN.match(name) and name.startswith(msg_id)
    assert mode(Path(queue.maildrop, name)) == 0o640  # the runner's group reads it
    result = pickup(queue)
    assert [m.id for m in result.accepted] == [msg_id] and result.rejected == []
    assert os.listdir(queue.maildrop) == []
    message = queue.load(msg_id)
    assert message.drop == name and message.uid == os.getuid()
    assert message.envelope.requested_sender == "www-data"
    assert Path(message.data_path).read_bytes() == MESSAGE


def test_pickup_applies_the_sender_policy_again(queue):
    forged = (b"From: boss@bank.test\r\nTo: bob@example.org\r\nBcc: spy@example.org\r\n"
              b"Message-ID: <m2@x>\r\n\r\nhi\r\n")
    msg_id = drop(queue, forged, "bob@example.org")
    trailer_path = Path(queue.maildrop, os.listdir(queue.maildrop)[0])
    data = trailer_path.read_bytes()
    body, trailer = data[:len(forged)], json.loads(data[len(forged):])
    trailer.update(sender="boss@bank.test", smtputf8=True, dsn_notify="never")  # what a user may write
    trailer_path.write_bytes(body + json.dumps(trailer).encode() + b"\n")
    pickup(queue)
    message = queue.load(msg_id)
    stored = email.message_from_bytes(Path(message.data_path).read_bytes())
    assert message.envelope.sender == LOGIN and not message.envelope.smtputf8
    assert message.envelope.dsn_notify == "NEVER"  # normalised like -N
    assert LOGIN in stored["From"] and stored["Bcc"] is None
    assert message.envelope.size == os.path.getsize(message.data_path)


@pytest.mark.parametrize("content, reason", [
    (b"just text", "no trailer"),
    (MESSAGE + b'{"version": 1, "size": 3, "recipients": ["bob@example.org"]}\n', "size"),
    (MESSAGE + json.dumps({"version": 1, "size": len(MESSAGE), "recipients": ["a@b\r\nRCPT TO:<c@d>"]})
     .encode() + b"\n", "recipient"),
    (MESSAGE + json.dumps({"version": 1, "size": len(MESSAGE), "recipients": []}).encode() + b"\n", "recipient"),
    (MESSAGE + json.dumps({"version": 2, "size": len(MESSAGE)}).encode() + b"\n", "version"),
], ids=["no-trailer", "wrong-size", "crlf-recipient", "no-recipient", "version"])
def test_invalid_drops_go_to_corrupt_and_maildrop_ends_empty(queue, content, reason):
    name = f"{new_id()}.0123456789abcdef"
    Path(queue.maildrop, name).write_bytes(content)
    result = pickup(queue)
    assert result.accepted == [] and [r[0] for r in result.rejected] == [name]
    assert reason in result.rejected[0][2]
    assert os.listdir(queue.maildrop) == [] and os.listdir(queue.corrupt) == [name]
    assert queue.ids() == []


def test_a_symlink_or_odd_name_in_maildrop_is_not_followed(queue, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    os.symlink(secret, os.path.join(queue.maildrop, f"{new_id()}.0123456789abcdef"))
    Path(queue.maildrop, "whatever").write_bytes(b"x")
    result = pickup(queue)
    assert len(result.rejected) == 2 and result.accepted == []
    assert os.listdir(queue.maildrop) == [] and queue.ids() == []


def test_a_drop_already_picked_up_is_not_queued_twice(queue):
    msg_id = drop(queue)
    name = os.listdir(queue.maildrop)[0]
    saved = Path(queue.maildrop, name).read_bytes()
    pickup(queue)
    Path(queue.maildrop, name).write_bytes(saved)  # as if the runner died before unlinking it
    assert pickup(queue).accepted == []
    assert queue.ids() == [msg_id] and os.listdir(queue.maildrop) == []


def test_a_request_the_pickup_could_not_read_is_refused_to_the_caller(queue):
    """A trailer longer than the pickup reads would be refused there, after the caller's exit 0."""
    recipients = [f"r{i:04d}-{'x' * 60}@example.org" for i in range(1000)]
    with pytest.raises(DataError, match="KiB"):
        drop(queue, MESSAGE, *recipients)
    assert os.listdir(queue.maildrop) == [] and os.listdir(queue.droptmp) == []


def test_dropper_cannot_write_without_maildrop(tmp_path):
    queue = Queue(str(tmp_path / "missing"))
    with pytest.raises(CantCreate, match="maildrop-tmp"):
        queue.spool(drop=True)


# -- listing and administration ----------------------------------------------------------------


def test_listing_has_the_postfix_layout(queue):
    assert postsuper.listing(queue) == "Mail queue is empty\n"
    first = enqueue(queue, MESSAGE, "bob@example.org", "carol@example.org")
    with queue.lock(first) as message:
        message.recipients[0].state = "sent"
        message.recipients[1].reply = "451 4.3.0 try later"
        message.attempts, message.next_attempt = 1, message.arrival + 60
        queue.save(message)
    text = postsuper.listing(queue, now=message.arrival)
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-") and "--Size--" in lines[0] and "-Sender/Recipient-" in lines[0]
    assert lines[1].startswith(f"{first}  ") and lines[1].endswith(f"  {LOGIN}")
    assert str(len(MESSAGE)) in lines[1].split()
    assert lines[2].startswith("(451 4.3.0 try later; next try ")
    assert lines[3].strip() == "carol@example.org"  # bob is done: not listed
    assert lines[3].index("carol") == lines[1].index(LOGIN)
    assert lines[-1] == "-- 1 Kbytes in 1 Request."


def test_failed_messages_are_listed_with_a_mark_and_requeued(queue):
    msg_id = enqueue(queue)
    with queue.lock(msg_id) as message:
        message.recipients[0].state, message.recipients[0].reply = "bounced", "550 5.1.1 no such user"
        queue.fail(message, "550 5.1.1 no such user")
    assert queue.ids() == [] and queue.failed_ids() == [msg_id]
    text = postsuper.listing(queue)
    assert f"{msg_id}!" in text and "(failed: 550 5.1.1 no such user)" in text
    assert "0 Requests. 1 failed" in text
    requeued = postsuper.requeue(queue, msg_id)
    assert queue.ids() == [msg_id] and queue.failed_ids() == []
    assert [(r.state, r.attempts) for r in requeued.recipients] == [("deferred", 0)]
    assert queue.load(msg_id).failure is None


def test_show_delete_and_retry_now(queue):
    msg_id = enqueue(queue)
    shown = postsuper.show(queue, msg_id)
    assert shown.startswith(f"Queue-ID: {msg_id} (queue)".encode()) and shown.endswith(MESSAGE)
    assert b"Recipient: bob@example.org deferred attempts=0" in shown
    with queue.lock(msg_id) as message:
        message.next_attempt = time.time() + 3600
        queue.save(message)
    assert postsuper.retry_now(queue) == [msg_id]
    assert queue.load(msg_id).next_attempt <= time.time()
    with queue.lock(msg_id):
        with pytest.raises(Exception, match="being delivered"):
            postsuper.delete(queue, msg_id)  # another process holds it
    postsuper.delete(queue, msg_id)
    assert queue.ids() == [] and os.listdir(queue.tmp) == []
    with pytest.raises(UsageError, match="no message"):
        postsuper.show(queue, msg_id)
    with pytest.raises(UsageError, match="not a queue id"):
        postsuper.delete(queue, "../../etc")


def test_lock_is_exclusive_and_sees_a_message_gone(queue):
    msg_id = enqueue(queue)
    with queue.lock(msg_id) as first:
        with queue.lock(msg_id) as second:
            assert first is not None and second is None
        queue.remove(first)
    with queue.lock(msg_id) as again:
        assert again is None


def test_format_listing_marks_a_message_in_delivery():
    message = QueuedMessage(id="0" * 16, path="/q/queue/x", envelope=envelope(), arrival=0.0,
                            recipients=[Recipient("bob@example.org")])
    text = format_listing([message], [], {"0" * 16}, now=0.0)
    assert text.splitlines()[1].startswith("0" * 16 + "*")


def test_a_refusal_is_recorded_for_mailq_and_forgotten_with_its_entry(queue):
    name = f"{new_id()}.0123456789abcdef"
    Path(queue.maildrop, name).write_bytes(b"just text")
    pickup(queue)
    [item] = postsuper.corrupt_items(queue)
    assert (item.name, item.kind, item.reason, item.dropped) == (name, "file", "no trailer", True)
    assert "(refused at pickup: no trailer)" in postsuper.listing(queue)
    os.unlink(Path(queue.corrupt, name))  # removed by hand: its reason goes after a grace time
    postsuper.purge_kept(queue, 86400, lambda *removed: pytest.fail(f"nothing is purged: {removed}"))
    assert os.listdir(queue.reasons) == [name]
    old = time.time() - 120
    os.utime(Path(queue.reasons, name), (old, old))
    postsuper.purge_kept(queue, 86400, lambda *removed: pytest.fail(f"nothing is purged: {removed}"))
    assert os.listdir(queue.reasons) == [] and postsuper.listing(queue) == "Mail queue is empty\n"


def test_format_listing_marks_corrupt_entries_and_counts_maildrop():
    refused = CorruptItem("0" * 16 + ".0123456789abcdef", "0" * 16, "file", 10, 0.0, 0.0, "From: x differs")
    odd = CorruptItem("odd name", "odd name", "FIFO", 0, 0.0, 0.0, None)
    lines = format_listing([], [], set(), now=0.0, corrupt=[refused, odd], waiting=2).splitlines()
    assert lines[1].startswith("0" * 16 + "#") and lines[1].endswith(f"  corrupt/{refused.name}")
    assert lines[2] == "(refused at pickup: From: x differs)"
    assert lines[4].startswith("odd?name        #") and lines[5] == "(not a message)"
    assert lines[-1] == ("-- 0 Kbytes in 0 Requests. 2 corrupt (marked #, never delivered). "
                         "2 in maildrop/, waiting for pickup.")
    assert format_listing([], [], set(), now=0.0) == "Mail queue is empty\n"


# -- bounce layout (pure) ----------------------------------------------------------------------


def test_bounce_is_an_rfc3464_report():
    data = bounce.build(
        failures=[bounce.Failure("bob@example.org", "550 5.1.1 <bob@example.org>: no such user"),
                  bounce.Failure("carol@example.org", "451 4.3.0 try later", expired=True)],
        original_headers=bounce.header_block(MESSAGE), queue_id="0123456789ABCDEF", arrival=1_700_000_000,
        sender=LOGIN, to="www@example.org", reporting_mta="host.example", remote_mta="smtp.163.test",
        message_id="<b1@163.test>", boundary="=b0undary", now=1_700_000_100,
    )
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied" and report["To"] == "<www@example.org>"
    notice, status, headers = report.get_payload()
    assert "<bob@example.org>: refused: 550 5.1.1" in notice.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    blocks = [dict(block.items()) for block in status.get_payload()]
    assert blocks[0]["Reporting-MTA"] == "dns; host.example"
    assert blocks[1] == {
        "Final-Recipient": "rfc822; bob@example.org", "Action": "failed", "Status": "5.1.1",
        "Remote-MTA": "dns; smtp.163.test", "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.org>: no such user",
        "Last-Attempt-Date": blocks[1]["Last-Attempt-Date"],
    }
    assert blocks[2]["Status"] == "4.4.7"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <m1@163.test>" in headers.get_payload()
    assert "body" not in headers.get_payload()


@pytest.mark.parametrize("bounce_to, account, expected", [
    ("ops@example.org", "www-data", "ops@example.org"),
    (None, "www-data", "admin@example.org"),  # the submitting account's local name, through the aliases
    (None, None, LOGIN),  # no such account
])
def test_bounce_recipient(bounce_to, account, expected):
    assert bounce.recipient_for(bounce_to, account, LOGIN, {"default": "admin@example.org"}, "web1") == expected
    assert bounce.recipient_for(None, "nobody", LOGIN, {}, "web1") == LOGIN  # no alias: the login
