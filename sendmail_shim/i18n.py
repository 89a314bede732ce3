"""Messages in the admin's language (English, Simplified Chinese), translated only when shown.

``_("cannot connect to {where}: {reason}").format(where=…, reason=…)`` marks a message for
xgettext and returns a `Text`: a plain English ``str`` (what log lines, SMTP replies, bounces and
``str(exc)`` see, so they stay English and stable) that remembers its template and arguments.
`localize` and `describe` translate it at the moment it is printed for a person. Importing this
module costs nothing: ``gettext`` and the catalog are loaded only when a translated message is
actually shown, which the success path never does.

The language follows gettext's rule (LANGUAGE, then LC_ALL, LC_MESSAGES, LANG; C/POSIX means
English) without ``setlocale``: the catalog ships with the package, the system locale need not
be installed.
"""

import os

DOMAIN = "sendmail-shim"
LOCALE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locale")


class Text(str):
    """English text that can still be shown translated; see the module docstring."""

    msgid: str
    params: dict

    def format(self, /, **params) -> "Text":  # named placeholders only: translators reorder them
        text = Text(str.format(self, **params))
        text.msgid, text.params = self.msgid, params
        return text


def _(msgid: str) -> Text:
    text = Text(msgid)
    text.msgid, text.params = msgid, {}
    return text


def language(environ=None) -> str:
    """``zh_CN`` for a Simplified Chinese locale, else ``en``."""
    environ = os.environ if environ is None else environ
    locale = next((environ[k] for k in ("LC_ALL", "LC_MESSAGES", "LANG") if environ.get(k)), "")
    if locale.partition(".")[0] in ("", "C", "POSIX"):
        return "en"  # as in GNU gettext, LANGUAGE is ignored in the C locale
    first = (environ.get("LANGUAGE") or locale).split(":")[0]
    name = first.partition(".")[0].partition("@")[0].replace("-", "_").lower()
    return "zh_CN" if name in ("zh", "zh_cn", "zh_sg") or name.startswith("zh_hans") else "en"


def localize(value, environ=None) -> str:
    """``value`` in the admin's language: a `Text` translated, anything else as ``str``."""
    if not isinstance(value, Text):
        return "" if value is None else str(value)
    catalog = _catalog(language(environ))
    if catalog is None:
        return str(value)
    params = {k: localize(v, environ) if isinstance(v, Text) else v for k, v in value.params.items()}
    try:
        return catalog.gettext(value.msgid).format(**params)
    except (KeyError, IndexError, ValueError):  # a broken translation must not hide the error
        return str(value)


def describe(exc, environ=None) -> str:
    """An error as one line in the admin's language: the message, then the hint."""
    message = exc.args[0] if exc.args else ""
    hint = getattr(exc, "hint", None)
    if not hint:
        return localize(message, environ)
    return localize(_("{message} ({hint})").format(message=message, hint=hint), environ)


_catalogs: dict = {}


def _catalog(lang: str):
    if lang == "en":
        return None
    if lang not in _catalogs:
        import gettext

        _catalogs[lang] = gettext.translation(DOMAIN, LOCALE_DIR, languages=[lang], fallback=True)
    return _catalogs[lang]
