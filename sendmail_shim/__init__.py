"""sendmail-shim: a sendmail(8) replacement that relays over verified, authenticated SMTP."""

__version__ = "0.1.0"
