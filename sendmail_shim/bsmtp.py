"""`-bs`: an SMTP server on stdin/stdout (Symfony Mailer, Laravel, SwiftMailer defaults).

The greeting goes out before anything is read; each message goes through the same path as
``-t`` (`submit.accept`), and the reply to the final dot is 250 only once the message is
delivered or durably queued. Nothing but SMTP replies is ever written to stdout.
"""

import os
import socket
import tempfile

from . import message, reader, submit
from .errors import EX_OK, DataError, ShimError
from .log import one_line
from .options import Options
from .replies import smtp_reply

MAX_COMMAND = 2048  # RFC 5321 §4.5.3.1.4 says 512; clients with long parameters exist
MAX_LINE = 64 * 1024  # a DATA line; the message reader breaks lines over 998 octets itself
SPOOL_IN_MEMORY = 1 << 20
# EHLO keywords. SIZE without a number: the limit is the relay's, learnt only when delivering.
# No PIPELINING (replies are written one by one anyway), no AUTH or STARTTLS (a local pipe).
EXTENSIONS = ("8BITMIME", "SIZE", "SMTPUTF8", "ENHANCEDSTATUSCODES")
_BODY_TYPES = ("7BIT", "8BITMIME")


class Session:
    """One SMTP session: the command state machine and its replies."""

    def __init__(self, opts, config, stdin, stdout, stderr, environ):
        self.opts, self.config, self.environ = opts, config, environ
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.hostname = socket.gethostname()
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.recipients: list[str] = []

    def reply(self, text: str) -> None:
        self.stdout.write(text.encode("utf-8", "replace") + b"\r\n")
        self.stdout.flush()

    def serve(self) -> int:
        try:
            self.reply(f"220 {self.hostname} ESMTP sendmail-shim")
            while self._command():
                pass
        except BrokenPipeError:  # the client closed its end without QUIT: as EOF, the session is over
            _discard_unwritten(self.stdout)
        return EX_OK

    def _command(self) -> bool:
        """Read and answer one command; False when the session is over."""
        line = self.stdin.readline(MAX_COMMAND + 1)
        if not line:
            return False  # EOF without QUIT ends the session cleanly
        if len(line) > MAX_COMMAND and not line.endswith(b"\n"):
            self._discard_rest_of_line()
            self.reply("500 5.5.2 Line too long")
            return True
        command = line.rstrip(b"\r\n").decode("utf-8", "replace")
        verb, _, argument = command.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self.reply("502 5.5.2 Command not recognized")
            return True
        return handler(argument.strip()) is not False

    def _discard_rest_of_line(self) -> None:
        while True:
            chunk = self.stdin.readline(MAX_COMMAND)
            if not chunk or chunk.endswith(b"\n"):
                return

    def smtp_HELO(self, argument: str):
        if not argument:
            return self.reply("501 5.5.4 Syntax: HELO hostname")
        self.reset()
        self.reply(f"250 {self.hostname}")

    def smtp_EHLO(self, argument: str):
        if not argument:
            return self.reply("501 5.5.4 Syntax: EHLO hostname")
        self.reset()
        for line in (self.hostname, *EXTENSIONS):
            self.stdout.write(f"250-{line}\r\n".encode())
        self.reply("250 HELP")

    def smtp_MAIL(self, argument: str):
        if self.mail_from is not None:
            return self.reply("503 5.5.1 Error: nested MAIL command")
        parsed = _path(argument, "FROM:")
        if parsed is None:
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        address, parameters = parsed
        refusal = _check_mail_parameters(parameters)
        if refusal:
            return self.reply(refusal)
        self.mail_from = address
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, argument: str):
        if self.mail_from is None:
            return self.reply("503 5.5.1 Error: need MAIL command")
        parsed = _path(argument, "TO:")
        if parsed is None or not parsed[0]:
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        address, parameters = parsed
        if parameters:  # NOTIFY/ORCPT belong to DSN, which is not offered
            return self.reply(f"555 5.5.4 Unsupported option: {parameters[0]}")
        try:
            [resolved] = message.parse_recipient_args([address])
            message.resolve_local(resolved, self.config.aliases, self.hostname,
                                  self.config.sender if self.config.local_mail == "login" else None)
        except (DataError, ValueError) as exc:
            return self.reply(f"550 5.1.1 {one_line(exc)}")
        self.recipients.append(address)
        self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, argument: str):
        if self.mail_from is None:
            return self.reply("503 5.5.1 Error: need MAIL command")
        if not self.recipients:
            return self.reply("503 5.5.1 Error: need RCPT command")
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
            if not self._read_data(spool):
                # The client went away: nothing was accepted, and the exit status says so.
                raise DataError("input ended inside DATA, before the final '.': the message was not accepted")
            spool.seek(0)
            self.reply(self._accept(spool))
        self.reset()

    def _read_data(self, spool) -> bool:
        """Copy DATA lines up to the lone dot into `spool`, removing dot-stuffing; False at EOF.

        As Postfix's smtpd_forbid_bare_newline=normalize: a bare-LF line is a line (and is
        un-stuffed), but only <CR><LF>.<CR><LF> ends the data, so a body can never smuggle a
        second message past the end.
        """
        at_line_start = True  # a line longer than MAX_LINE arrives in pieces
        after_crlf = True
        while True:
            line = self.stdin.readline(MAX_LINE)
            if not line:
                return False
            if at_line_start:
                if line == b".\r\n" and after_crlf:
                    return True
                if line.startswith(b"."):
                    line = line[1:]
            at_line_start = line.endswith(b"\n")
            after_crlf = line.endswith(b"\r\n")
            spool.write(line)

    def _accept(self, spool) -> str:
        opts = Options(**{**vars(self.opts), "extract_recipients": False, "recipients": list(self.recipients),
                          "requested_sender": self.mail_from or None, "dot_ends": False})
        try:
            msg_id = submit.accept(reader.MessageReader(spool, dot_ends=False), opts, self.config,
                                   self.stderr, self.environ)
        except ShimError as exc:
            return smtp_reply(exc)
        return f"250 2.0.0 Ok: queued as {msg_id}"

    def smtp_RSET(self, argument: str):
        self.reset()
        self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, argument: str):
        self.reply("250 2.0.0 Ok")

    def smtp_VRFY(self, argument: str):
        self.reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, argument: str):
        self.reply("214 2.0.0 HELO EHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def smtp_QUIT(self, argument: str):
        self.reply("221 2.0.0 Bye")
        return False


def _path(argument: str, keyword: str) -> tuple[str, list[str]] | None:
    """``FROM:<a@b> BODY=8BITMIME`` → (``a@b``, [``BODY=8BITMIME``]); None on a syntax error."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword):].strip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end], rest[end + 1:].split()
    words = rest.split()
    return (words[0], words[1:]) if words else None


def _check_mail_parameters(parameters: list[str]) -> str | None:
    """The refusal for MAIL FROM parameters we did not offer or cannot honour, else None.

    The values change nothing: 8-bit content and the size are measured on the message itself.
    """
    for parameter in parameters:
        name, eq, value = parameter.partition("=")
        name = name.upper()
        if name == "SIZE" and eq and value.isdigit() and value.isascii():
            continue
        if name == "BODY" and eq and value.upper() in _BODY_TYPES:
            continue
        if name == "SMTPUTF8" and not eq:
            continue
        if name in ("SIZE", "BODY", "SMTPUTF8"):
            return f"501 5.5.4 Bad parameter: {parameter}"
        return f"555 5.5.4 Unsupported option: {parameter}"
    return None


def _discard_unwritten(stdout) -> None:
    """Point a broken stdout at /dev/null: the buffered reply left in it would otherwise fail
    again when Python flushes at exit, printing a traceback and exiting 120."""
    try:
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file descriptor (a test's BytesIO): nothing is flushed at exit
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def refuse_session(stdout, exc: ShimError) -> None:
    """Greet with 421 and the reason: Symfony and SwiftMailer put it in their exception."""
    out = getattr(stdout, "buffer", stdout)
    out.write(f"421 4.3.0 sendmail-shim: {one_line(exc)}\r\n".encode("utf-8", "replace"))
    out.flush()


def serve(opts, config, stdin, stdout, stderr, environ) -> int:
    return Session(opts, config, stdin, getattr(stdout, "buffer", stdout), stderr, environ).serve()
