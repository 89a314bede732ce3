"""-odb leaves the header policy to the pickup (pickup.py): that must change nothing but *when* it runs.

The property: for any command line and header, the synchronous front end (what -odi, -odq and
-bs do) and the deferred one (`pickup.request` in the caller, `pickup.accept` at pickup) produce the
same bytes and the same envelope, or both refuse the message — the deferred one either at once or
as `Rejected` at pickup. The only extra refusal allowed is `request`'s own: a recipient word that
is not printable or longer than 320 characters.
"""

import io

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sendmail_shim import config as config_module, message, pickup
from sendmail_shim.errors import DataError, Rejected, ShimError, UsageError
from sendmail_shim.options import Options
from sendmail_shim.reader import MessageReader
from tests.faults import COUNTS

CONFIG = config_module.build({"SMTP_USER": "alice@163.com", "SMTP_ALIASES": "root:admin@example.com"}, {})
ADDRESSES = [
    "bob@example.org", "Bob Smith <bob@example.org>", "root", "www-data", "x@localhost", "a@", "bad@@x",
    '"Doe, Jane" <jane@example.org>', "=?utf-8?b?5byg5LiJ?= <zhang@example.org>", "用户@例子.中国",
    "carol@exämple.org", "", "undisclosed-recipients:;", "team: a@example.org, b@example.org;",
    "alice@163.com", "Alice <ALICE@163.com>", "root (Cron Daemon)", "a@example.org\tb", "x" * 330 + "@e.org",
]
FIELDS = ["To", "Cc", "Bcc", "From", "Reply-To", "Resent-To", "Sender", "Subject"]


def without_generated(data: bytes) -> bytes:
    """The message without the Date and Message-ID fields the policy makes up (random, clock)
    when the header has none, e.g. when a second mbox From_ line turned it into body."""
    head, _, body = data.partition(b"\r\n\r\n")
    kept = [line for line in head.split(b"\r\n") if not line.startswith((b"Date: ", b"Message-ID: "))]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def outcome(function):
    try:
        return function(), None
    except ShimError as exc:
        return None, exc


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(ADDRESSES)), max_size=5),
       argv=st.lists(st.sampled_from(ADDRESSES), max_size=3), extract=st.booleans(),
       sender=st.sampled_from([None, "www-data@web.example", "root", "bad<"]),
       full_name=st.sampled_from([None, "Cron Daemon", "网站", "x\r\nBcc: evil@example.org"]),
       mbox_lines=st.integers(0, 2))
def test_deferred_policy_gives_what_the_front_end_gives(fields, argv, extract, sender, full_name, mbox_lines):
    header = b"".join(f"{name}: {value}\n".encode() for name, value in fields)
    stdin = (b"From someone Mon Nov 25 13:00:00 2024\n" * mbox_lines + header
             + b"Date: Mon, 25 Nov 2024 13:00:00 +0000\nMessage-ID: <fixed@example.org>\n\nbody\n")
    opts = Options(recipients=argv, extract_recipients=extract, requested_sender=sender, full_name=full_name,
                   dot_ends=False)

    def now():
        reader = MessageReader(io.BytesIO(stdin), dot_ends=False)
        headers, envelope = message.prepare(
            reader.read_header_block(), extract_recipients=extract, argv_recipients=argv, requested_sender=sender,
            policy=message.HeaderPolicy.from_config(CONFIG, full_name))
        out = io.BytesIO()
        return out, message.write(out, reader, headers, envelope)

    def later():  # what the -odb caller spools, then what the pickup makes of it
        reader = MessageReader(io.BytesIO(stdin), dot_ends=False)
        header_block = reader.read_header_block()
        fields_ = pickup.request(opts, header_block)
        spooled = io.BytesIO(header_block)
        spooled.seek(0, io.SEEK_END)
        reader.copy_body(spooled)
        out = io.BytesIO()
        return out, pickup.accept(CONFIG, fields_, io.BytesIO(spooled.getvalue()), out)

    expected, refusal = outcome(now)
    got, deferred_refusal = outcome(later)
    if expected is None:
        assert got is None, f"refused at once ({refusal}) but accepted at pickup"
        assert isinstance(deferred_refusal, (Rejected, UsageError, DataError))
    elif got is None:  # only request()'s own check may refuse what the front end takes
        assert isinstance(deferred_refusal, DataError) and not isinstance(deferred_refusal, Rejected)
        assert any(not word.isprintable() or len(word) > pickup.MAX_ADDRESS for word in argv)
    else:
        assert without_generated(got[0].getvalue()) == without_generated(expected[0].getvalue())
        assert got[1]._replace(message_id=None, size=0) == expected[1]._replace(message_id=None, size=0)
        assert (got[1].size, expected[1].size) == (len(got[0].getvalue()), len(expected[0].getvalue()))
    COUNTS["fuzz examples: deferred policy"] += 1


def test_request_refuses_only_what_needs_no_header_parsing():
    with pytest.raises(UsageError):
        pickup.request(Options(extract_recipients=True), b"Subject: nobody\r\n\r\n")
    assert pickup.request(Options(extract_recipients=True), b"Bcc: x\r\n\r\n")["extract"] is True
    assert pickup.request(Options(recipients=["bad@@x"]), b"")["recipients"] == ["bad@@x"]  # the pickup's to judge
    with pytest.raises(DataError, match="-F is too long"):
        pickup.request(Options(recipients=["a@b.c"], full_name="x" * 1001), b"")
