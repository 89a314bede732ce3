"""Sending budgets (budgets.py), the ledger that keeps them in the spool (ledger.py), and the
provider replies that pause an account (replies.RULES)."""

import datetime
import json
import os
import threading

import pytest

from sendmail_shim import budgets, clock, config, providers, replies
from sendmail_shim.budgets import DAY, Budget, Send
from sendmail_shim.errors import CantCreate
from sendmail_shim.ledger import Ledger

# 2026-12-05 10:00 in Beijing (02:00 UTC)
T0 = datetime.datetime(2026, 12, 5, 2, 0, tzinfo=datetime.timezone.utc).timestamp()


def test_per_minute_budget_gives_the_slot_when_the_oldest_send_of_the_window_expires():
    budget = Budget(messages_per_minute=3)
    sent = [Send(T0 + 1, 1), Send(T0 + 2, 1), Send(T0 + 3, 1)]
    assert budgets.next_slot(budget, sent[:2], T0 + 4) == T0 + 4
    assert budgets.next_slot(budget, sent, T0 + 4) == T0 + 61 + budgets.SLACK


def test_provider_day_ends_at_its_midnight_and_a_rolling_day_24_hours_after_the_oldest_send():
    beijing = Budget(messages_per_day=2, day_offset=8.0)
    midnight = datetime.datetime(2026, 12, 5, 16, 0, tzinfo=datetime.timezone.utc).timestamp()  # 6 Dec 00:00 CST
    sent = [Send(T0, 1), Send(T0 + 60, 1)]
    assert budgets.next_slot(beijing, sent, T0 + 120) == midnight
    assert budgets.next_slot(beijing, sent, midnight + 1) == midnight + 1  # a new day
    rolling = Budget(messages_per_day=2)
    assert budgets.next_slot(rolling, sent, T0 + 120) == T0 + DAY + budgets.SLACK
    assert budgets.pause_until(beijing, "day", sent, T0 + 120) == midnight
    assert budgets.pause_until(rolling, "day", sent, T0 + 120) == T0 + DAY
    assert budgets.pause_until(rolling, "quarter", sent, T0) == T0 + 900


def test_recipients_per_day_count_every_recipient():
    budget = Budget(recipients_per_day=10)
    sent = [Send(T0, 6), Send(T0 + 10, 3)]
    assert budgets.next_slot(budget, sent, T0 + 20, recipients=1) == T0 + 20
    assert budgets.next_slot(budget, sent, T0 + 20, recipients=2) == T0 + DAY + budgets.SLACK  # the 6 must expire
    assert budgets.next_slot(budget, sent, T0 + 20, recipients=50) == T0 + 10 + DAY + budgets.SLACK  # all, no more


def test_presets_carry_their_budgets_and_settings_override_them():
    gmail = config.build({"SMTP_PROVIDER": "gmail"}, {})
    assert (gmail.budget.messages_per_day, gmail.budget.recipients_per_message) == (500, 100)
    raised = config.build({"SMTP_PROVIDER": "gmail", "SMTP_MESSAGES_PER_DAY": "2000",
                           "SMTP_RECIPIENTS_PER_MESSAGE": "0"}, {})
    assert (raised.budget.messages_per_day, raised.budget.recipients_per_message) == (2000, None)
    assert config.build({"SMTP_PROVIDER": "163"}, {}).budget.messages_per_connection == 10
    assert config.build({"SMTP_PROVIDER": "outlook"}, {}).queue_connections == 3
    assert config.build({}, {}).budget == Budget()
    with pytest.raises(config.ConfigError, match="SMTP_MESSAGES_PER_MINUTE"):
        config.build({"SMTP_MESSAGES_PER_MINUTE": "many"}, {})


@pytest.mark.parametrize("provider, stage, code, text, action, wait", [
    ("163", "mail", 554, "MI:SFQ 4 smtp.163.test,sender frequency over quota", replies.PAUSE_ACCOUNT, "quarter"),
    ("163", "mail", 550, "MI:STC 4 sender daily count over quota", replies.PAUSE_ACCOUNT, "day"),
    ("126", "mail", 451, "MI:DMC 4 too many mails in this connection", replies.RETRY_MESSAGE, replies.RECONNECT),
    ("163", "dot", 554, "DT:SPM 163 smtp7,content judged spam", replies.REFUSE_MESSAGE, None),
    ("qq", "mail", 550, "Ip frequency limited", replies.PAUSE_ACCOUNT, "hour"),
    ("gmail", "mail", 550, "5.5.4 Daily user sending limit exceeded.", replies.REFUSE_MESSAGE, None),
    ("gmail", "rcpt", 550, "5.4.5 Daily user sending limit exceeded.", replies.PAUSE_ACCOUNT, "day"),
    ("gmail", "mail", 421, "4.7.0 Try again later, closing connection.", replies.PAUSE_ACCOUNT, "minute"),
    ("outlook", "mail", 432, "4.3.2 Concurrent connections limit exceeded", replies.PAUSE_ACCOUNT, "minute"),
    ("outlook", "dot", 554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
     replies.PAUSE_ACCOUNT, "day"),
    ("custom", "mail", 554, "MI:SFQ quota", replies.REFUSE_MESSAGE, None),  # not the provider's words here
    ("custom", "mail", 421, "4.4.2 closing", replies.RETRY_MESSAGE, replies.RECONNECT),
    ("custom", "rcpt", 421, "4.4.2 closing", replies.RETRY_MESSAGE, None),
])
def test_provider_replies_pause_the_account_instead_of_bouncing(provider, stage, code, text, action, wait):
    verdict = replies.classify(stage, code, None, text, provider)
    assert (verdict.action, verdict.wait) == (action, wait)
    if action == replies.PAUSE_ACCOUNT:
        assert (verdict.exit_code, verdict.permanent, verdict.dsn[0]) == (75, False, "4")
        assert "limit" in verdict.hint or "connections" in verdict.hint


def test_spam_refusal_of_163_has_its_own_hint():
    assert "spam" in replies.classify("dot", 554, None, "DT:SPM 163 smtp7", "163").hint


def test_ledger_reserves_within_the_budget_and_keeps_the_count_in_the_spool(tmp_path):
    budget = Budget(messages_per_minute=2, day_offset=8.0)
    ledger = Ledger(str(tmp_path), "Alice@163.test", budget)
    assert [ledger.reserve(1, T0), ledger.reserve(1, T0 + 1)] == [T0, T0 + 1]
    assert ledger.reserve(1, T0 + 2) == T0 + 60 + budgets.SLACK  # nothing recorded
    again = Ledger(str(tmp_path), "alice@163.test", budget)  # another process, after a restart
    assert len(again.read(T0 + 2).sent) == 2
    assert again.reserve(1, T0 + 63) == T0 + 63
    assert oct(os.stat(tmp_path / "accounts").st_mode & 0o777) == "0o700"
    saved = json.loads((tmp_path / "accounts" / "alice@163.test.json").read_text())
    assert [at for at, _n in saved["sent"]] == [T0 + 63]  # only the window is kept


def test_a_pause_holds_every_reservation_until_it_ends_and_is_said_once(tmp_path):
    ledger = Ledger(str(tmp_path), "alice@163.test", providers.PRESETS["163"].budget)
    pause, new = ledger.pause("quarter", "554 MI:SFQ over quota", T0)
    assert (pause.until, new) == (T0 + 900, True)
    assert ledger.pause("quarter", "554 MI:SFQ over quota", T0 + 1) == (pause, False)  # already paused as long
    assert ledger.reserve(1, T0 + 10) == T0 + 900
    assert ledger.read(T0 + 10).pause.reason == "554 MI:SFQ over quota"
    assert ledger.read(T0 + 901).pause is None
    assert ledger.reserve(1, T0 + 901) == T0 + 901
    assert ledger.pause("day", "550 MI:STC daily count", T0 + 902)[1]  # a new one is news


def test_an_account_without_limits_writes_nothing(tmp_path):
    assert Ledger(str(tmp_path), "a@b.test", Budget()).reserve(3, T0) == T0
    assert not (tmp_path / "accounts").exists()


@pytest.mark.parametrize("planted", ["garbage", "link", "directory"])
def test_a_damaged_or_planted_ledger_counts_as_empty(tmp_path, planted):
    accounts = tmp_path / "accounts"
    accounts.mkdir(mode=0o700)
    path = accounts / "a@b.test.json"
    if planted == "garbage":
        path.write_text('{"sent": [[1, "x"]]')
    elif planted == "link":
        (tmp_path / "elsewhere").write_text(json.dumps({"sent": [[T0, 1]] * 5, "pause": None}))
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
    ledger = Ledger(str(tmp_path), "a@b.test", Budget(messages_per_minute=1))
    assert ledger.read(T0).sent == ()
    if planted != "directory":
        assert ledger.reserve(1, T0) == T0


def test_concurrent_reservations_never_overspend(tmp_path):
    budget = Budget(messages_per_minute=25)
    granted = []

    def take():
        for _ in range(10):
            if Ledger(str(tmp_path), "a@b.test", budget).reserve(1, T0) == T0:
                granted.append(1)

    threads = [threading.Thread(target=take) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 25


def test_test_clock_moves_forward_only(tmp_path, monkeypatch):
    path = str(tmp_path / "clock")
    monkeypatch.setenv(clock.TEST_CLOCK, path)
    before = clock.now()
    clock.wait_until(before + DAY)
    assert clock.now() >= before + DAY
    clock.wait_until(before)  # in the past: nothing moves
    assert clock.now() >= before + DAY


@pytest.mark.skipif(os.geteuid() != 0, reason="root's queue run in a spool another user owns")
def test_roots_run_gives_the_ledger_to_the_spool_owner_and_follows_no_link(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, 65534, 65534)
    ledger = Ledger(str(spool), "a@b.test", Budget(messages_per_minute=5))
    assert ledger.reserve(1, T0) == T0
    assert {(p.name, p.stat().st_uid) for p in (spool / "accounts").iterdir()} == {
        ("a@b.test.json", 65534), ("a@b.test.lock", 65534)}
    assert (spool / "accounts").stat().st_uid == 65534

    elsewhere = tmp_path / "elsewhere"  # a compromised spool owner points accounts/ at root's files
    elsewhere.mkdir()
    (spool / "accounts").rename(tmp_path / "old")
    (spool / "accounts").symlink_to(elsewhere)
    with pytest.raises(CantCreate):
        ledger.reserve(1, T0 + 1)
    assert list(elsewhere.iterdir()) == []


def test_a_send_counts_from_when_the_relay_took_it(tmp_path):
    ledger = Ledger(str(tmp_path), "a@b.test", Budget(messages_per_minute=1))
    assert ledger.reserve(2, T0) == T0
    ledger.settle(Send(T0, 2), T0 + 5)  # connection set-up and transfer took 5 s
    assert ledger.read(T0 + 6).sent == (Send(T0 + 5, 2),)
    assert ledger.reserve(1, T0 + 6) == T0 + 5 + 60 + budgets.SLACK
