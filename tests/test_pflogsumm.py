"""The log speaks Postfix: Debian's pflogsumm, the real one, summarises a log the real console script
wrote (``pflogsumm --syslog-name=sendmail-shim``), and its counts are what happened at the relay."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.faults import wait_idle

PFLOGSUMM = Path("/usr/sbin/pflogsumm")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PFLOGSUMM.exists(), reason="needs Debian's pflogsumm (apt-get install pflogsumm; "
                                                      "make apt-deps installs it as root)"),
]


def mail(subject: str, *recipients: str) -> bytes:
    return (f"From: Web <www-data@web1.example>\nTo: {', '.join(recipients)}\nSubject: {subject}\n\n"
            f"a line of {subject}\n").encode()


def pflogsumm(log: Path) -> str:
    proc = subprocess.run([str(PFLOGSUMM), "--syslog-name=sendmail-shim", "--problems-first", str(log)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def grand_totals(report: str) -> dict[str, int]:
    """'Grand Totals' → {'received': 5, 'delivered': 7, 'bytes received': …}."""
    section = report.split("Grand Totals", 1)[1].split("\n\n", 2)[1:]
    rows = re.findall(r"^\s+(\d+)\s+([a-z][a-z /]*?)(?:\s+\(.*\))?$", "\n".join(section), re.M)
    return {name: int(count) for count, name in rows}


def per_domain(report: str) -> dict[str, tuple[int, int, int]]:
    """The delivery summary per recipient domain ('Host/Domain Summary: Message Delivery', 'Per-Domain
    Traffic Summary' in later versions) → {domain: (messages sent, bytes, defers)}."""
    header = re.search(r"^(?:Host/Domain Summary: Message Delivery|Per-Domain Traffic Summary) *$", report, re.M)
    section = report[header.end():].split("\n\n", 1)[0]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+ [smhd]\s+[\d.]+ [smhd]\s+(\S+)$", section, re.M)
    return {domain: (int(sent), int(size), int(defers)) for sent, size, defers, domain in rows}


def section_lines(report: str, title: str) -> list[str]:
    body = report.split(f"\n{title}\n", 1)[1].split("\n", 1)[1]  # after the underline
    return [line.strip() for line in body.split("\n\n", 1)[0].splitlines() if line.strip()]


def test_pflogsumm_counts_what_the_shim_did(shim_factory, relay):
    """Sent, deferred (451) and bounced (550) recipients in several domains, over -odi, -odq then -q,
    and -odb (the detached pickup): pflogsumm's totals and per-domain lines add up to them."""
    relay.refuse["later@b.example"] = "451 4.3.0 try again later"
    relay.refuse["gone@c.example"] = "550 5.1.1 no such user"
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive")
    shim.run("-i", "a1@a.example", "a2@a.example", "b1@b.example", stdin=mail("all sent", "a1@a.example"))
    shim.run("-i", "a3@a.example", "later@b.example", stdin=mail("one deferred", "a3@a.example"))
    shim.run("-i", "gone@c.example", "c1@c.example", stdin=mail("one bounced", "c1@c.example"))
    shim.run("-odq", "-i", "later@b.example", stdin=mail("queued", "later@b.example"))
    shim.run("-odb", "-i", "b2@b.example", stdin=mail("background", "b2@b.example"))
    wait_idle(shim.config_file)  # the detached pickup and delivery of -odb
    shim.run("-q")  # the queued one, and the one deferred before: both deferred (again)

    report_domain = relay.login.split("@")[1]
    sent = sorted(r for m in relay.messages for r in m.rcpt_tos)
    assert sent == sorted(["a1@a.example", "a2@a.example", "b1@b.example", "a3@a.example", "c1@c.example",
                           "b2@b.example", relay.login])  # … the last one the failure report about gone@
    log = shim.log_file.read_text()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d \S+ sendmail-shim/pickup\[\d+\]: ", log)
    sizes = {qid: int(size) for qid, size in re.findall(r"\]: ([0-9A-F]{16}): from=<[^>]*>, size=(\d+), ", log)}

    report = pflogsumm(shim.log_file)
    totals = grand_totals(report)
    assert totals["received"] == 5  # what local users submitted (pickup lines); not the report
    assert totals["delivered"] == 7  # one per recipient, the report's too
    # later@, in two messages, one of them tried twice
    assert totals["deferred"] == 2 and re.search(r"\b2\s+deferred\s+\(3\s+deferrals\)", report)
    assert totals["bounced"] == 1 and totals["rejected"] == 0
    assert totals["senders"] == 1 and totals["recipients"] == 7 and totals["recipient hosts/domains"] == 4
    report_id = re.search(r"sendmail-shim/bounce\[\d+\]: [0-9A-F]{16}: sender non-delivery notification: (\S+)$",
                          log, re.M).group(1)
    assert totals["bytes received"] == sum(size for qid, size in sizes.items() if qid != report_id)

    domains = per_domain(report)
    assert {domain: (count, defers) for domain, (count, _, defers) in domains.items()} == {
        "a.example": (3, 0),
        "b.example": (2, 3),  # b1@ and b2@ sent; later@ deferred three times
        "c.example": (1, 0),  # c1@; gone@ bounced
        report_domain: (1, 0),  # the failure report
    }
    assert domains[report_domain][1] == sizes[report_id]
    assert section_lines(report, "Senders by message count") == [f"5   {relay.login}"]
    bounces = section_lines(report, "message bounce detail (by relay)")
    assert any(line.endswith("5.1.1 no such user") for line in bounces)
    assert any(line.endswith("4.3.0 try again later") for line in section_lines(report, "message deferral detail"))
    assert "Warnings: none" in report and "Fatal Errors: none" in report


def test_pflogsumm_counts_warnings_and_a_message_refused_at_pickup(shim_factory, relay_factory):
    """A message the header policy refuses at pickup is cleanup's reject; a warning is a warning."""
    relay = relay_factory(cert="untrusted")
    shim = shim_factory(relay, SMTP_TLS_VERIFY="no", SMTP_CA_FILE=None,  # -odb: the pickup applies the policy
                        SMTP_LOCAL_MAIL="refuse")
    shim.run("-i", "nobody-alias", stdin=mail("refused", "x@a.example"))  # a local name without an alias
    wait_idle(shim.config_file)
    report = pflogsumm(shim.log_file)
    totals = grand_totals(report)
    assert (totals["received"], totals["rejected"], totals["delivered"]) == (1, 1, 1)  # the notice to the login
    assert any("has no alias" in line for line in section_lines(report, "message reject detail"))
    assert any("TLS certificate of" in line for line in section_lines(report, "Warnings"))
