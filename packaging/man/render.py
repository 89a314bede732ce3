"""Print the man page source with its configuration table filled in from sendmail_shim.config.KEYS.

Usage: python3 packaging/man/render.py packaging/man/sendmail-shim.8.rst | rst2man - sendmail-shim.8

The table is generated so that the man page lists exactly the keys the program accepts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sendmail_shim import __version__
from sendmail_shim.config import KEYS

PLACEHOLDER = ".. configuration-keys"


def keys_section() -> str:
    return "".join(f"``{key}``\n    {doc}\n\n" for key, doc in KEYS.items())


def render(template: str) -> str:
    if PLACEHOLDER not in template:
        raise SystemExit(f"render.py: the template has no {PLACEHOLDER!r} line")
    return template.replace(PLACEHOLDER + "\n", keys_section()).replace("@VERSION@", __version__)


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1]).read_text(encoding="utf-8")))
