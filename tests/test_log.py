"""The log's line formats (log.py), pure: Postfix's fields and number formats, and no value that can
forge a line or a field for a parser such as pflogsumm."""

import re

import pytest

from sendmail_shim import log
from sendmail_shim.log import MessageLog, Timing

# pflogsumm 1.1.5's own patterns (/usr/sbin/pflogsumm): the time stamp, the program and queue id,
# the qmgr line and the smtp line
RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?"
                     r"(?:[\+\-](?:\d{2}):(?:\d{2})|Z) \S+ (.+)$")
PROGRAM = re.compile(r"^(?:postfix|sendmail-shim)(?:/(?:smtps|submission))?/([^\[:]*).*?: ([^:\s]+)")
SIZE = re.compile(r"from=<([^>]*)>, size=(\d+)")
DELIVERY = re.compile(r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]+), (?:conn_use=[^,]+, )?delay=([^,]+), "
                      r"(?:delays=[^,]+, )?(?:dsn=[^,]+, )?status=(\S+)(.*)$")
TIMING = Timing(arrival=100.0, active=100.5, handoff=101.0, connected=101.3, done=101.72)


@pytest.mark.parametrize("seconds, text", [
    (0, "0"), (0.004, "0"), (0.005, "0.01"), (0.42, "0.42"), (0.999, "1"), (1.234, "1.2"), (9.96, "10"),
    (12.3, "12"), (99.5, "100"), (86400.4, "86400"), (-1, "0"),
])
def test_seconds_are_formatted_as_postfix_format_tv(seconds, text):
    assert log.seconds(seconds) == text


def test_the_smtp_line_has_postfix_fields_in_postfix_order():
    line = log.delivery_line("1A2B3C4D5E6F7A8B", "bob@example.org", status="sent", orig_to="root", conn_use=2,
                             relay=log.relay_name("smtp.163.com", "1.2.3.4", 465), timing=TIMING,
                             dsn=log.dsn_for("250 2.0.0 Mail OK", "sent"), reply="250 2.0.0 Mail OK queued as 1")
    assert line == ("1A2B3C4D5E6F7A8B: to=<bob@example.org>, orig_to=<root>, relay=smtp.163.com[1.2.3.4]:465, "
                    "conn_use=2, delay=1.7, delays=0.5/0.5/0.3/0.42, dsn=2.0.0, "
                    "status=sent (250 2.0.0 Mail OK queued as 1)")
    assert DELIVERY.search(line).groups()[:4] == ("bob@example.org", "smtp.163.com[1.2.3.4]:465", "1.7", "sent")


def test_without_a_connection_the_relay_is_none_and_the_time_is_transmission():
    line = log.delivery_line("ID", "bob@example.org", status="deferred", relay=log.relay_name("x", None, 25),
                             timing=TIMING._replace(connected=None), dsn="4.4.1", reply="cannot connect to x:25")
    assert ", relay=none, delay=1.7, delays=0.5/0.5/0/0.72, dsn=4.4.1, status=deferred (cannot connect to x:25)" in line


def test_the_ambiguous_case_is_deferred_in_postfix_words():
    line = log.delivery_line("ID", "b@x", status="deferred", relay="none", timing=TIMING, dsn="4.4.2",
                             reply="x closed the connection (at DOT)", ambiguous=True)
    assert line.endswith("status=deferred (x closed the connection (at DOT) -- message may be sent more than once)")


@pytest.mark.parametrize("reply, status, fallback, dsn", [
    ("250 2.0.0 OK", "sent", "", "2.0.0"),
    ("250 OK", "sent", "", "2.0.0"),
    ("550 5.1.1 no such user", "bounced", "", "5.1.1"),
    ("550-5.1.1 no such user", "bounced", "", "5.1.1"),
    ("451 4.3.0 try later", "deferred", "", "4.3.0"),
    ("535 5.7.8 authentication failed", "deferred", "", "4.7.8"),  # a 5xx that only defers: 4.x.x
    ("550 4.1.1 inconsistent", "bounced", "", "5.0.0"),  # an enhanced code of another class is ignored
    ("cannot connect to x:25: connection refused", "deferred", "4.4.1", "4.4.1"),
    ("local configuration error, see the log", "deferred", "", "4.0.0"),
    ("", "bounced", "5.6.0", "5.6.0"),
])
def test_dsn_is_the_reply_s_status_in_the_class_of_the_log_status(reply, status, fallback, dsn):
    assert log.dsn_for(reply, status, fallback) == dsn


def test_the_other_events_are_postfix_lines():
    assert log.pickup_line("ID", 33, "www-data@web1") == "ID: uid=33 from=<www-data@web1>"
    assert log.postdrop_line("ID", 33, 1234) == "ID: uid=33, size=1234 (queue maildrop)"
    assert log.message_id_line("ID", "<a.b@web1>") == "ID: message-id=<a.b@web1>"
    assert log.message_id_line("ID", None) == "ID: message-id=<>"
    assert log.active_line("ID", "alice@163.com", 1234, 2) == (
        "ID: from=<alice@163.com>, size=1234, nrcpt=2 (queue active)")
    assert log.expired_line("ID", "alice@163.com") == "ID: from=<alice@163.com>, status=expired, returned to sender"
    assert log.notification_line("ID", "REPORT") == "ID: sender non-delivery notification: REPORT"
    assert log.removed_line("ID") == "ID: removed"
    assert log.removed_line("ID", "kept in failed/ for\n31.0d") == "ID: removed (kept in failed/ for 31.0d)"
    assert log.removed_line("a-fifo: x") == "a-fifo??x: removed"  # a corrupt/ entry's name
    assert log.reject_line("ID", "cannot parse recipient 'x@@y'", "alice@163.com") == (
        "ID: reject: header cannot parse recipient 'x@@y' from local; from=<alice@163.com>: "
        "5.7.1 message content rejected")
    assert log.problem_line("warning", "TLS certificate\nnot verified") == "warning: TLS certificate not verified"
    assert log.problem_line("error", "disk full", "ID") == "error: ID: disk full"
    assert SIZE.search(log.active_line("ID", "a@x", 12, 1)).groups() == ("a@x", "12")


@pytest.mark.parametrize("hostile", [
    "x>, size=99999", "a@b>, relay=evil, delay=0, status=sent (250)", "a\nJan  1 00:00:00 h postfix/smtp[1]: X: to=<v>",
])
def test_no_address_or_message_id_forges_a_field_or_a_line(hostile):
    for line in (log.pickup_line("ID", 0, hostile), log.message_id_line("ID", hostile),
                 log.delivery_line("ID", "b@x", status="deferred", relay="none", timing=TIMING, dsn="4.0.0",
                                   orig_to=hostile), log.active_line("ID", hostile, 5, 1)):
        assert "\n" not in line
        size = SIZE.search(line)
        assert size is None or size.group(2) == "5"  # only the real size field
        delivery = DELIVERY.search(line)
        assert delivery is None or delivery.group(1) == "b@x"


def test_the_local_rule_line_names_the_name_the_recipient_and_the_rule():
    assert log.local_line("ID", "root", "alice@163.com", "no alias; SMTP_LOCAL_MAIL=login") == (
        "ID: info: local recipient <root> delivered to <alice@163.com> (no alias; SMTP_LOCAL_MAIL=login)")
    line = log.local_line("ID", "a>\nx: to=<v>, status=sent", "b@x", "alias (x)")
    assert "\n" not in line and line.count("<") == 2 and line.endswith("<b@x> (alias ?x?)")
    assert DELIVERY.search(line) is None  # pflogsumm never takes it for a delivery


def test_a_file_name_is_a_token_that_cannot_be_taken_for_a_field():
    assert log.token("warning: x") == "warning??x"
    assert log.token("a b[1]<2>") == "a?b?1??2?"
    assert log.token("") == "?"
    assert log.pickup_line("ID.0123abcd", 0, None).startswith("ID.0123abcd: uid=0 from=<>")


def test_file_lines_are_what_pflogsumm_parses():
    line = log.file_line("1A2B: removed", log.QMGR, now=1764076801.25, hostname="web1", pid=42)
    head, rest = line.split(" web1 ", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.250000[+-]\d\d:\d\d", head)
    match = RFC3339.match(line.rstrip("\n"))
    assert match and match.group(7) == "sendmail-shim/qmgr[42]: 1A2B: removed"
    assert PROGRAM.match(match.group(7)).groups() == ("qmgr", "1A2B")


def test_message_log_writes_each_event_under_its_program(tmp_path):
    path = tmp_path / "mail.log"
    message_log = MessageLog(str(path), use_syslog=False)
    message_log.received("ID", uid=33, sender="www-data@web1", message_id="<m@web1>")
    message_log.active("ID", sender="alice@163.com", size=10, nrcpt=1)
    message_log.delivery("ID", "bob@x", status="sent", relay="none", timing=TIMING, dsn="2.0.0", reply="250 OK")
    message_log.removed("ID")
    message_log.removed("ID2", program=log.POSTSUPER)
    message_log.warning(log.SMTP, "TLS not verified")
    message_log.error(log.PICKUP, "maildrop not picked up", msg_id="ID3")
    programs = [PROGRAM.match(RFC3339.match(line).group(7)).groups() for line in path.read_text().splitlines()]
    assert programs == [("pickup", "ID"), ("cleanup", "ID"), ("qmgr", "ID"), ("smtp", "ID"), ("qmgr", "ID"),
                        ("postsuper", "ID2"), ("smtp", "warning"), ("pickup", "error")]
    with pytest.raises(AssertionError):
        message_log.removed("ID", program="postfix")  # only the programs of PROGRAMS
