"""The submission service (``sendmail-shim -bd``): users who may not write the queue hand their
mail to it over a Unix socket; it knows their uid from the kernel and enforces their limits."""

import email
import os
import re
import stat

import pytest

from tests.localusers import needs_other_users, service_site
from tests.relay import RELAY_LOGIN
from tests.shim import wait_for

pytestmark = [pytest.mark.e2e, *needs_other_users]


def message(subject: str, to: str = "bob@example.org", sender: str = "www-data@web.example") -> bytes:
    return f"From: {sender}\nTo: {to}\nSubject: {subject}\nMessage-ID: <{subject}@test>\n\nhello\n".encode()


def delivered(relay, subject: str) -> list:
    return [m for m in relay.messages if f"Subject: {subject}".encode() in m.data]


def test_an_unprivileged_caller_submits_and_the_service_delivers(relay, relay_password):
    with service_site(relay, relay_password) as (site, (service, caller, _)):
        for name in ("", "tmp", "queue", "failed", "corrupt", "maildrop", "maildrop-tmp"):
            st = os.stat(site.spool / name)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o711 if not name else 0o700, service.pw_uid)
        proc = site.send(caller.pw_name, "-t", "-i", stdin=message("unpriv-1"))
        assert proc.returncode == 0, proc.stderr.decode()
        wait_for(lambda: delivered(relay, "unpriv-1"))
        (sent,) = delivered(relay, "unpriv-1")
        assert sent.mail_from == RELAY_LOGIN and sent.rcpt_tos == ["bob@example.org"]
        headers = email.message_from_bytes(sent.data)
        assert RELAY_LOGIN in headers["From"] and headers["Reply-To"] == "www-data@web.example"
        log = site.log_text()  # the service (postdrop) and the pickup both name the submitter
        submitted = re.search(rf" sendmail-shim/postdrop\[\d+\]: ([0-9A-F]{{16}}): uid={caller.pw_uid}, size=\d+ "
                              r"\(queue maildrop\)$", log, re.M)
        assert submitted, log
        assert re.search(rf" sendmail-shim/pickup\[\d+\]: {submitted.group(1)}: uid={caller.pw_uid} "
                         r"from=<www-data@web\.example>$", log, re.M)
        wait_for(lambda: not os.listdir(site.spool / "queue") and not os.listdir(site.spool / "maildrop"))


@pytest.mark.parametrize("mode", ["-odq", "-odi"])
def test_other_modes_of_an_unprivileged_caller_go_through_the_service_too(relay, relay_password, mode):
    # SMTP_LOCAL_MAIL=refuse: a local name without an alias is refused (by default it reaches the login)
    with service_site(relay, relay_password, roles=("svc", "www"), SMTP_LOCAL_MAIL="refuse") as (site, (_, caller)):
        proc = site.send(caller.pw_name, mode, "-i", "carol@example.org", stdin=message(f"mode{mode}"))
        assert proc.returncode == 0, proc.stderr.decode()
        wait_for(lambda: delivered(relay, f"mode{mode}"))
        # the policy still refuses synchronously where the caller waits for it
        proc = site.send(caller.pw_name, mode, "-i", "root", stdin=message("no-alias"))
        assert proc.returncode == 65 and "has no alias" in proc.stderr.decode()


def test_without_the_service_the_caller_hears_it_and_nothing_is_lost(relay, relay_password):
    with service_site(relay, relay_password, roles=("svc", "www")) as (site, (_, caller)):
        site.stop_daemon()
        proc = site.send(caller.pw_name, "-i", "bob@example.org", stdin=message("no-daemon"))
        assert proc.returncode == 75
        assert "the submission service is not running" in proc.stderr.decode()
        assert os.listdir(site.spool / "maildrop") == [] and os.listdir(site.spool / "queue") == []
