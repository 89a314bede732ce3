"""Issue 13: nothing in the spool stops the runner, and nothing in it is trusted beyond its owner.

Odd entries in maildrop/, maildrop-tmp/ and tmp/; hostile trailers and the submitter's uid; a
refused request whose file changes after the pickup; a full disk after a partial acceptance; root
and planted symlinks; where failure reports and local configuration errors go. Delivery is
counted at the real relay."""

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from sendmail_shim import bounce, pickup as pickup_module, postsuper
from sendmail_shim.errors import DataError
from sendmail_shim.queue import Queue, new_id
from sendmail_shim.runner import Selector
from tests.relay import RELAY_LOGIN
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON, readable_by_others
from tests.test_hardening import small_disk
from tests.localusers import SYSTEM_PYTHON, accounts
from tests.test_queue import MESSAGE, drop, pickup, queue
from tests.test_runner import (
    Site, message_bytes, received, site, site_factory,
)

OLD = time.time() - 3600


def make_old(*paths) -> None:
    for path in paths:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


def drop_request(site: Site, *recipients: str, requested: str | None = None) -> tuple[str, str]:
    """A maildrop file as the -odb caller writes it; returns (queue id, Message-ID)."""
    data, message_id = message_bytes(recipients[0])
    with site.queue.spool(drop=True) as spool:
        spool.file.write(data)
        msg_id = spool.commit_request({"recipients": list(recipients), "requested_sender": requested})
    return msg_id, message_id


def per_recipient(relay) -> Counter:
    return Counter(r for m in relay.messages for r in m.rcpt_tos)


# -- 1. odd entries in maildrop/ ---------------------------------------------------------------


def plant(queue: Queue, kind: str, outside: Path) -> str:
    """An entry of `kind` in maildrop/; returns its name."""
    name = "0" if kind.startswith("directory") else f"{new_id()}.0123456789abcdef"
    path = Path(queue.maildrop, name)
    if kind.startswith("directory"):
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o600)
    elif kind == "symlink":
        path.symlink_to(outside)
    elif kind == "hard-link":
        os.link(outside, path)
    else:
        name = "not-a-drop-name"
        Path(queue.maildrop, name).write_bytes(b"x")
    return name


@pytest.mark.parametrize("kind", ["directory", "directory-again", "fifo", "socket", "symlink", "hard-link", "bad-name"])
def test_an_odd_entry_in_maildrop_is_quarantined_and_the_pickup_goes_on(queue, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.write_text("not yours")
    if kind == "directory-again":  # corrupt/0 is taken by an earlier one
        plant(queue, "directory", outside)
        pickup(queue)
    name = plant(queue, kind, outside)
    msg_id = drop(queue)
    result = pickup(queue)
    assert [m.id for m in result.accepted] == [msg_id] and [r[0] for r in result.rejected] == [name]
    assert os.listdir(queue.maildrop) == [] and queue.ids() == [msg_id]
    assert len(os.listdir(queue.corrupt)) == (2 if kind == "directory-again" else 1)
    assert outside.read_text() == "not yours"


@pytest.mark.e2e
def test_a_directory_in_maildrop_does_not_stop_the_queue_run(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="queue")
    shim.run("-i", "bob@example.org", stdin=b"Subject: queued\n\nbody\n")
    (shim.queue_dir / "maildrop" / "0").mkdir()
    shim.run("-q")
    assert len(relay.messages) == 1 and os.listdir(shim.queue_dir / "corrupt") == ["0"]
    assert os.listdir(shim.queue_dir / "maildrop") == [] and os.listdir(shim.queue_dir / "queue") == []


def test_a_broken_maildrop_never_stops_deliveries(site, relay):
    msg_id, message_id = site.submit()
    os.rmdir(site.queue.maildrop)
    Path(site.queue.maildrop).write_bytes(b"not a directory")
    assert site.run().sent == 1 and received(relay) == {message_id: 1}
    assert " sendmail-shim/pickup[" in site.log_text() and ": error: maildrop not picked up: " in site.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users and switching to them needs root")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON) or not shutil.which("setpriv") or not readable_by_others(),
                    reason="needs /usr/bin/python3, setpriv and a source tree other users can read")
def test_the_service_runner_quarantines_what_it_cannot_read_and_trusts_uid_only_from_the_receiver(
        relay, relay_password):
    """The runner as the service user: a file it may not read goes to corrupt/; the trailer's
    "uid" counts only in a file the spool's owner wrote (the receiver), else the file's owner."""
    base = Path(tempfile.mkdtemp(prefix="shim-robust-", dir="/tmp"))  # traversable by other users
    try:
        base.chmod(0o755)
        with accounts("svc", "www") as (service, caller):
            spool = base / "spool"
            spool.mkdir()
            os.chown(spool, service.pw_uid, service.pw_gid)
            spool.chmod(0o711)
            Queue(str(spool)).ensure()
            ca_file = shutil.copy(relay.ca_file, base / "ca.pem")
            site = Site(base, relay, relay_password, SENDMAIL_SHIM_QUEUE_DIR=str(spool), SMTP_CA_FILE=str(ca_file))
            for path in (site.password_file, site.log_file):
                path.touch()
                os.chown(path, service.pw_uid, service.pw_gid)

            unreadable = spool / "maildrop" / f"{new_id()}.0123456789abcdef"
            unreadable.write_bytes(b"root's")
            unreadable.chmod(0o600)
            received_ids = {}
            for owner, claimed in ((service, 4242), (caller, 0)):  # the receiver's, a user's own claim
                data, message_id = message_bytes(f"{owner.pw_name}@example.org")
                with site.queue.spool(drop=True) as writer:
                    writer.file.write(data)
                    msg_id = writer.commit_request({"recipients": [f"{owner.pw_name}@example.org"], "uid": claimed})
                (path,) = (spool / "maildrop").glob(f"{msg_id}.*")
                os.chown(path, owner.pw_uid, service.pw_gid)
                received_ids[msg_id] = message_id

            proc = site.helper("run", python=SYSTEM_PYTHON, user=service.pw_name)
            assert proc.returncode == 0, proc.stderr.decode()
            assert received(relay) == dict.fromkeys(received_ids.values(), 1)
            assert os.listdir(spool / "corrupt") == [unreadable.name] and os.listdir(spool / "maildrop") == []
            log = site.log_text()
            picked = {i: next(line for line in log.splitlines() if f"]: {i}: uid=" in line and "/pickup[" in line)
                      for i in received_ids}
            service_id, caller_id = received_ids
            assert f"]: {service_id}: uid=4242 from=<" in picked[service_id]
            assert f"]: {caller_id}: uid={caller.pw_uid} from=<" in picked[caller_id]  # not 0
            assert "cannot open: Permission denied" in log
            OUTPUTS.extend(site.files_text())
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 2. odd entries in maildrop-tmp/ and tmp/ --------------------------------------------------


def test_clean_tmp_removes_any_old_entry_and_never_follows_a_symlink(queue, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("keep")
    entries = []
    for directory in (queue.tmp, queue.droptmp):
        nested = Path(directory, "a-directory")
        (nested / "sub" / "deeper").mkdir(parents=True)
        (nested / "data").write_bytes(b"x")
        (nested / "sub" / "file").write_bytes(b"x")
        os.mkfifo(Path(directory, "a-fifo"))
        Path(directory, "a-link").symlink_to(outside)
        os.mknod(Path(directory, "a-socket"), stat.S_IFSOCK | 0o600)
        entries += [nested, Path(directory, "a-fifo"), Path(directory, "a-link"), Path(directory, "a-socket")]
    make_old(*entries)
    removed = queue.clean_tmp()
    assert sorted(removed) == sorted(p.name for p in entries)
    assert os.listdir(queue.tmp) == [] and os.listdir(queue.droptmp) == []
    assert (outside / "data").read_text() == "keep"


# -- 3. the trailer ----------------------------------------------------------------------------


def trailer_of(fields: bytes) -> bytes:
    return b'{"version": 1, "size": %d, "recipients": ["bob@example.org"], ' % len(MESSAGE) + fields + b"}"


@pytest.mark.parametrize("trailer", [
    b"[" * 50_000,
    trailer_of(b'"x": ' + b"[" * 20_000 + b"]" * 20_000),
    trailer_of(b'"x": {"y": 1}'),
    trailer_of(b'"x": 1.5'),
    trailer_of(b'"x": ["a", 3]'),
], ids=["deep-list", "deep-value", "object-value", "float-value", "mixed-list"])
def test_a_trailer_that_is_not_a_flat_object_is_refused_without_recursion(queue, trailer):
    name = f"{new_id()}.0123456789abcdef"
    Path(queue.maildrop, name).write_bytes(MESSAGE + trailer + b"\n")
    result = pickup(queue)
    assert result.accepted == [] and result.rejected == [(name, os.getuid(), "not a flat trailer")]
    assert os.listdir(queue.corrupt) == [name]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_the_trailer_uid_counts_only_in_a_file_of_the_spool_owner(queue):
    trusted = drop(queue)  # written by the spool's owner: the receiver, or root's -odb caller
    name = os.listdir(queue.maildrop)[0]
    _rewrite_trailer(Path(queue.maildrop, name), uid=4242)
    untrusted = drop(queue, MESSAGE, "carol@example.org")
    other = next(n for n in os.listdir(queue.maildrop) if n.startswith(untrusted))
    _rewrite_trailer(Path(queue.maildrop, other), uid=0)
    os.chown(Path(queue.maildrop, other), 65534, 65534)
    result = pickup(queue)
    assert {m.id: m.uid for m in result.accepted} == {trusted: 4242, untrusted: 65534}


def _rewrite_trailer(path: Path, **fields) -> None:
    content = path.read_bytes()
    body, _, line = content[:-1].rpartition(b"\n")
    trailer = {**json.loads(line), **fields}
    path.write_bytes(body + b"\n" + json.dumps(trailer).encode() + b"\n")


# -- 4. refusal notices from what the pickup read -------------------------------------------------


def test_a_refused_request_changed_after_the_pickup_still_gets_its_notice(site_factory, relay, monkeypatch):
    """The user who wrote a refused request may keep its descriptor: the notice is built from
    what the pickup read, and another user's message is delivered whatever the file becomes."""
    site = site_factory(relay, SMTP_LOCAL_MAIL="refuse")  # a local name without an alias is refused
    _, refused_mid = drop_request(site, "no-alias-here", requested="web@example.org")
    _, good_mid = drop_request(site, "bob@example.org")
    original = pickup_module.empty_maildrop

    def pickup_then_truncate(queue, accept):
        result = original(queue, accept)
        for name in os.listdir(queue.corrupt):
            os.truncate(os.path.join(queue.corrupt, name), 0)
        return result

    monkeypatch.setattr(pickup_module, "empty_maildrop", pickup_then_truncate)
    stats = site.run()
    assert (stats.picked_up, stats.refused_drops, stats.bounces) == (1, 1, 1)
    assert received(relay)[good_mid] == 1
    (notice,) = [m for m in relay.messages if m.rcpt_tos == [RELAY_LOGIN]]
    assert refused_mid in notice.data.decode() and "has no alias" in notice.data.decode()


def test_a_notice_that_cannot_be_built_is_logged_and_the_run_goes_on(site_factory, relay, monkeypatch):
    site = site_factory(relay, SMTP_LOCAL_MAIL="refuse")  # a local name without an alias is refused
    drop_request(site, "no-alias-here")
    _, good_mid = drop_request(site, "bob@example.org")
    build = bounce.build

    def failing(**fields):
        if fields.get("refusal"):
            raise ValueError("cannot build it")
        return build(**fields)

    monkeypatch.setattr(bounce, "build", failing)
    assert site.run().sent == 1 and received(relay) == {good_mid: 1}
    assert ": error: cannot queue the notice" in site.log_text()


# -- 5. a full disk after a partial acceptance ---------------------------------------------------


def fill(disk: Path) -> Path:
    """Fill the file system of `disk`; returns the file to remove to free it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_after_a_partial_acceptance_never_sends_a_second_copy(relay, site_factory, small_disk):
    disk, _ = small_disk
    # one connection: the message is settled before the other one frees its blocks
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_DIR=str(disk / "spool"), SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    msg_id, _ = site.submit("dave@example.org", "bob@example.org", "carol@example.org")
    time.sleep(0.002)  # ids sort by the millisecond: this one comes second
    other_id, other_mid = site.submit("erin@example.org")
    relay.refuse.update({"bob@example.org": "451 4.3.0 later", "carol@example.org": "451 4.3.0 later"})
    filler = fill(disk)

    proc = site.helper("run")  # dave takes it, the others are deferred, the state cannot be written
    assert proc.returncode == 0, proc.stderr.decode()
    assert per_recipient(relay) == {"dave@example.org": 1, "erin@example.org": 1}
    assert [r.state for r in site.queue.load(msg_id).recipients] == ["sent", "deferred", "deferred"]
    assert f"{msg_id}: " in site.log_text() and "No space left on device" in site.log_text()

    relay.refuse["bob@example.org"] = "550 5.1.1 no such user"  # now its report cannot be queued either
    fill(disk)  # the other message's blocks are free again
    site.run(selector=Selector("I", msg_id))
    assert per_recipient(relay)["dave@example.org"] == 1 and site.queue.ids() == [msg_id]

    filler.unlink()
    del relay.refuse["carol@example.org"]
    postsuper.retry_now(site.queue)
    site.run()
    assert per_recipient(relay) == {"dave@example.org": 1, "erin@example.org": 1, "carol@example.org": 1,
                                    RELAY_LOGIN: 1}  # the report about bob
    assert site.queue.failed_ids() == [msg_id] and other_id not in site.queue.ids()
    assert received(relay)[other_mid] == 1


def test_a_pickup_on_a_full_disk_leaves_the_drop_and_still_delivers_the_queue(relay, site_factory, small_disk):
    disk, _ = small_disk
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_DIR=str(disk / "spool"))
    _, queued_mid = site.submit()
    dropped_id, dropped_mid = drop_request(site, "carol@example.org")
    filler = fill(disk)
    proc = site.helper("run")
    assert proc.returncode == 0, proc.stderr.decode()
    assert received(relay) == {queued_mid: 1} and len(os.listdir(site.queue.maildrop)) == 1
    assert f"{dropped_id}." in site.log_text() and "No space left on device" in site.log_text()
    filler.unlink()
    site.run()
    assert received(relay) == {queued_mid: 1, dropped_mid: 1} and os.listdir(site.queue.maildrop) == []


# -- 6. root never follows a link in the spool -----------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="root's clean-up is what is tested")
def test_root_never_follows_a_symlink_planted_in_the_spool(queue, tmp_path):
    """The spool's owner (the service user) may plant links where root, running -q or --delete,
    removes things: root removes the link, never what is behind it."""
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    for name in ("keep", "data"):
        (private / name).write_text("root's")
    msg_id = drop(queue)
    planted = [Path(queue.tmp, "planted"), Path(queue.tmp, new_id()), Path(queue.droptmp, "planted")]
    for link in planted:
        link.symlink_to(private)
    make_old(*planted)
    queue.clean_tmp()
    Path(queue.tmp, msg_id).symlink_to(private)  # where the pickup removes a half-done pickup
    assert [m.id for m in pickup(queue).accepted] == [msg_id]
    assert os.listdir(queue.tmp) == [] and os.listdir(queue.droptmp) == []

    queued = Path(queue.queue, msg_id)  # a message directory replaced by a link
    for name in ("data", "envelope.json"):
        shutil.copy(queued / name, private / name)
    os.rename(queued, tmp_path / "moved-away")
    queued.symlink_to(private)
    with pytest.raises(DataError):
        postsuper.delete(queue, msg_id)

    os.rmdir(queue.tmp)  # tmp/ itself replaced by a link
    Path(queue.tmp).symlink_to(private)
    (private / "sub").mkdir()
    (private / "sub" / "data").write_text("root's")
    make_old(private / "sub")
    queue.clean_tmp()
    assert sorted(os.listdir(private)) == ["data", "envelope.json", "keep", "sub"]
    assert (private / "keep").read_text() == "root's" and (private / "sub" / "data").exists()


# -- 7. failure reports go to the submitting account; local errors are quoted nowhere ---------------


def test_failure_reports_go_to_the_submitting_account_not_to_the_requested_sender(relay, site_factory):
    account = pwd.getpwuid(os.getuid()).pw_name
    site = site_factory(relay, SMTP_ALIASES=f"{account}:ops@example.org", SMTP_LOCAL_MAIL="refuse")
    relay.refuse["bob@example.org"] = "550 5.1.1 no such user"
    site.submit("bob@example.org", requested="victim@example.net")
    drop_request(site, "no-alias-here", requested="victim@example.net")  # refused at pickup
    site.run()
    reports = relay.messages
    assert len(reports) == 2 and all(m.rcpt_tos == ["ops@example.org"] for m in reports)
    assert all("victim@example.net" in m.data.decode() for m in reports)  # shown, not used


def test_a_failing_password_command_is_quoted_nowhere_but_on_the_admins_terminal(relay, site_factory):
    failing = "echo 'vault said: denied for secret-vault-xyz' >&2; exit 3"
    site = site_factory(relay, SMTP_PASSWORD_COMMAND=failing)
    msg_id, _ = site.submit(arrival=time.time() - 100)
    queue_run = subprocess.run([SHIM_PYTHON, str(SHIM), "-q"], capture_output=True, text=True,
                               env=site.environ(), cwd=site.base, timeout=60)
    assert queue_run.returncode == 0 and "secret-vault-xyz" not in queue_run.stderr + queue_run.stdout
    assert site.queue.load(msg_id).last_reply == "local configuration error, see the log"
    site.config = site.config._replace(max_queue_age=50)  # gives up: a report quoting the last reply
    postsuper.retry_now(site.queue)
    site.run()  # the report cannot go either: it is queued
    listing = postsuper.listing(site.queue)
    assert "local configuration error, see the log" in listing
    site.config = site.config._replace(password_command=f"cat {site.password_file}")
    postsuper.retry_now(site.queue)
    site.run()
    (report,) = relay.messages
    assert "local configuration error, see the log" in report.data.decode()
    log = site.log_text()
    assert "SMTP_PASSWORD_COMMAND failed with exit status 3" in log
    for text in [log, listing, report.data.decode(), *site.files_text()]:
        assert "secret-vault-xyz" not in text
    check = subprocess.run([SHIM_PYTHON, str(SHIM), "--check"], capture_output=True, text=True,
                           env=site.environ(SMTP_PASSWORD_COMMAND=failing), cwd=site.base, timeout=60)
    assert "secret-vault-xyz" in check.stdout  # the administrator's own terminal
    OUTPUTS.extend([queue_run.stderr, check.stdout, check.stderr])
