"""TLS client certificates (SMTP_TLS_CERT_FILE, SMTP_TLS_KEY_FILE) against a relay that requires one."""

import ssl

import pytest

from sendmail_shim.errors import EX_CONFIG, EX_TEMPFAIL

pytestmark = pytest.mark.e2e
MESSAGE = b"Subject: cert\n\nsent with a client certificate\n"


@pytest.fixture
def cert_relay(relay_factory, ca):
    """A relay (no AUTH) whose TLS handshake requires a certificate from the test CA."""
    relay = relay_factory(security="tls", auth_required=False)
    relay.ssl_context.verify_mode = ssl.CERT_REQUIRED  # the context of every new handshake
    relay.ssl_context.load_verify_locations(ca.ca_file)
    return relay


@pytest.fixture
def client_cert(ca, tmp_path):
    leaf = ca.ca.issue_cert("client.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def test_a_relay_requiring_a_client_certificate_gets_it(shim_factory, cert_relay, client_cert):
    cert, key = client_cert
    shim = shim_factory(cert_relay, password=None, SENDMAIL_SHIM_DELIVERY="direct",
                        SMTP_TLS_CERT_FILE=str(cert), SMTP_TLS_KEY_FILE=str(key))
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    assert cert_relay.messages[0].rcpt_tos == ["bob@example.com"] and cert_relay.messages[0].tls
    check = shim.run("--check")
    assert f"TLS client certificate: {cert}" in check.stdout.decode()


def test_without_the_certificate_the_handshake_fails(shim_factory, cert_relay):
    shim = shim_factory(cert_relay, password=None, SENDMAIL_SHIM_DELIVERY="direct")
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_TEMPFAIL)
    assert "closed the connection" in result.stderr and cert_relay.messages == []


def test_a_key_others_can_read_is_refused(shim_factory, cert_relay, client_cert):
    cert, key = client_cert
    key.chmod(0o644)
    shim = shim_factory(cert_relay, password=None, SENDMAIL_SHIM_DELIVERY="direct",
                        SMTP_TLS_CERT_FILE=str(cert), SMTP_TLS_KEY_FILE=str(key))
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_CONFIG)
    assert "everyone can read it" in result.stderr and f"chmod 600 {key}" in result.stderr
    assert cert_relay.messages == []
