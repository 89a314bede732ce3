"""Every configuration key, with the line that documents it (README's table, the man page and
`--check` show them; config.build reads them)."""

from . import providers

SUBMIT_SOCKET = "/run/sendmail-shim/submit.sock"  # the submission service's socket (receiver.py)

# Every key a config file or the environment may set, with its documentation line (README).
KEYS = {
    "SMTP_PROVIDER": "preset: " + ", ".join(providers.PROVIDERS),
    "SMTP_HOST": "relay host name or address",
    "SMTP_PORT": "relay port (default from SMTP_SECURITY: tls 465, starttls 587, none 25)",
    "SMTP_SECURITY": "tls (implicit TLS), starttls (mandatory STARTTLS) or none",
    "SMTP_USER": "login; also the envelope sender and the From: address",
    "SMTP_FROM": "envelope sender for a relay without AUTH (when SMTP_USER is empty)",
    "SMTP_FROM_POLICY": "rewrite (default) or reject a From: that differs from the login",
    "SMTP_ALLOW_PLAINTEXT_AUTH": "yes to allow AUTH over an unencrypted connection",
    "SMTP_CA_FILE": "PEM file of CA certificates to trust instead of the system CAs",
    "SMTP_TLS_FINGERPRINT": "SHA-256 fingerprint the relay certificate must have",
    "SMTP_TLS_VERIFY": "no to skip certificate verification (warns on every use)",
    "SMTP_TLS_CERT_FILE": "PEM client certificate to log in with (a relay or Exchange connector that authenticates "
                          "servers by certificate)",
    "SMTP_TLS_KEY_FILE": "its private key, readable by the service user only (default: in SMTP_TLS_CERT_FILE)",
    "SMTP_HELO": "EHLO name (default: host name if it has a dot, else the address literal)",
    "SMTP_TIMEOUT": "seconds per SMTP operation (default 30)",
    "SMTP_CONNECT_TIMEOUT": "seconds to resolve and connect (default 15)",
    "SMTP_DEADLINE": "seconds for a whole delivery attempt (default 600)",
    "SMTP_ALIASES": "local name → address, e.g. root:admin@example.com,default:admin@example.com",
    "SMTP_LOCAL_MAIL": "login (default): mail to a local name that has no alias (nor a default alias) goes to "
                       "the login's mailbox, the name kept in To: and X-Original-To:; refuse: it is refused",
    "SMTP_PASSWORD_COMMAND": "command whose first output line is the password",
    "SMTP_KEYRING_BACKEND": "keyring backend class path (default: sendmail-shim's file backend)",
    "SMTP_AUTH": "password (default), xoauth2 or oauthbearer: log in with an OAuth2 access token the shim gets itself",
    "SMTP_OAUTH2_FLOW": "refresh_token (default: a person logs in once with --oauth2-login) or client_credentials "
                        "(app-only: the client secret stored with --set-password)",
    "SMTP_OAUTH2_CLIENT_ID": "the client (application) id registered with the identity provider",
    "SMTP_OAUTH2_CLIENT_CERT_FILE": "PEM file with the application's certificate and key, for client_credentials "
                                    "instead of a client secret (Microsoft's certificate credential)",
    "SMTP_OAUTH2_TENANT": "Microsoft tenant id or domain (default: organizations; consumers for Outlook.com)",
    "SMTP_OAUTH2_SCOPE": "scopes to ask for (default from the provider and flow)",
    "SMTP_OAUTH2_TOKEN_URL": "the identity provider's token endpoint (default from SMTP_PROVIDER)",
    "SMTP_OAUTH2_DEVICE_URL": "its device authorization endpoint, for --oauth2-login (default from SMTP_PROVIDER)",
    "SMTP_OAUTH2_CA_FILE": "PEM file of CA certificates for the identity provider instead of the system CAs",
    "SENDMAIL_SHIM_CREDENTIALS_FILE": "credential file of the built-in keyring backend",
    "SENDMAIL_SHIM_LOG_FILE": "file that gets the log lines too (one per event, in Postfix's format)",
    "SENDMAIL_SHIM_SYSLOG": "yes (default) to log to syslog facility mail",
    "SENDMAIL_SHIM_DELIVERY": "background (default), interactive, queue or direct",
    "SENDMAIL_SHIM_QUEUE_DIR": "queue directory",
    "SENDMAIL_SHIM_MAX_QUEUE_AGE": "give up on a message after this long (default 5d)",
    "SENDMAIL_SHIM_FAILED_AGE": "remove what failed/ and corrupt/ keep after this long (default 30d)",
    "SENDMAIL_SHIM_QUEUE_CONNECTIONS": "connections a queue run delivers over in parallel (default 8; 1 with "
                                       "the 163, 126, yeah, qq and exmail presets, whose servers block an "
                                       "address that opens too many; 3 with outlook)",
    "SMTP_MESSAGES_PER_CONNECTION": "messages one connection carries before a new one is opened (default from "
                                    "the preset: 10 with 163, 126, yeah; 0: no limit)",
    "SMTP_MESSAGES_PER_MINUTE": "messages the account sends per minute (default from the preset: 30 with outlook; "
                                "0: no limit)",
    "SMTP_MESSAGES_PER_HOUR": "messages the account sends per hour (0, the default: no limit)",
    "SMTP_MESSAGES_PER_DAY": "messages the account sends per day (default from the preset: 500 with gmail; "
                             "0: no limit)",
    "SMTP_RECIPIENTS_PER_MESSAGE": "recipients per SMTP transaction; a message to more goes in several (default "
                                   "from the preset: 100 with gmail; 0: no limit)",
    "SMTP_RECIPIENTS_PER_DAY": "recipients the account sends to per day (default from the preset: 10000 with "
                               "gmail and outlook; 0: no limit)",
    "SMTP_ACCOUNT_SENDERS": "in an account file (accounts.d/NAME.env): the senders (-f, From:) that pick this "
                            "account: addresses, or @domain for a whole domain",
    "SMTP_ACCOUNT_USERS": "in an account file: the local users who may pick it by sender (root always may)",
    "SMTP_FALLBACK": "accounts (names in accounts.d, or default) that take this account's mail, in order, when it "
                     "has waited longer than SMTP_FALLBACK_AFTER (paused, or the relay unreachable)",
    "SMTP_FALLBACK_AFTER": "how long a message waits for its account before a fallback takes it (default 30m)",
    "SENDMAIL_SHIM_BOUNCE_TO": "address that receives failure reports and notices (default: the submitting "
                               "user's alias, else the login)",
    "SENDMAIL_SHIM_SUBMIT_SOCKET": "the submission service's socket, for users who may not write the queue "
                                   f"(default {SUBMIT_SOCKET})",
    "SENDMAIL_SHIM_USER_RATE": "messages a local user (not root) may submit per minute (default 600)",
    "SENDMAIL_SHIM_USER_QUEUE_SIZE": "bytes a local user's mail may take in the queue (default 1G)",
    "SENDMAIL_SHIM_USER_MESSAGE_SIZE": "largest message a local user may submit (default 64M, the most)",
}
