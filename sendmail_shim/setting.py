"""The value of one configuration setting, read strictly: yes/no, a choice, a duration, a size,
a whole number, a list. Each reader takes the merged settings and a key, returns the value or the
default, and raises ConfigError naming the key and what was expected (config.build)."""

from .errors import ConfigError
from .i18n import _

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0", ""}


def words(text: str | None) -> tuple[str, ...]:
    """A comma-separated list (lower case), without empty items."""
    return tuple(word.strip().lower() for word in (text or "").split(",") if word.strip())


def flag(values, key: str, default: bool) -> bool:
    raw = values.get(key)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False if word else default
    raise ConfigError(_("{key}={value}: expected yes or no").format(key=key, value=raw))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def choice(get, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
    """One of `choices` (case-insensitive); `default`, else the first, when the key is unset."""
    value = (get(key) or default or choices[0]).lower()
    if value not in choices:
        raise ConfigError(_("{key}={value}: expected one of {choices}").format(
            key=key, value=value, choices=", ".join(choices)))
    return value


def seconds(values, key: str, default: float) -> float:
    raw = (values.get(key) or "").strip().lower()
    if not raw:
        return default
    unit = _UNITS.get(raw[-1])
    amount = number(key, raw[:-1] if unit else raw)
    if amount <= 0:
        raise ConfigError(_("{key}={value}: must be positive").format(key=key, value=raw))
    return amount * (unit or 1)


_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(values, key: str, default: int) -> int:
    """Bytes, with an optional k, M or G suffix."""
    raw = (values.get(key) or "").strip().lower()
    if not raw:
        return default
    unit = _SIZE_UNITS.get(raw[-1])
    digits = raw[:-1] if unit else raw
    if not (digits.isascii() and digits.isdigit()) or not int(digits):
        raise ConfigError(_("{key}={value}: expected a size in bytes, e.g. 500k, 64M or 1G").format(key=key, value=raw))
    return int(digits) * (unit or 1)


def whole(values, key: str, default: int, most: int) -> int:
    raw = (values.get(key) or "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise ConfigError(_("{key}={value}: expected a whole number from 1 to {most}").format(
            key=key, value=raw, most=most))
    return int(raw)


def number(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(_("{key}={value}: not a number").format(key=key, value=raw)) from None
