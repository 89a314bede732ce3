"""HACKING.md's "Life of a message" names only functions that exist."""

import importlib
import re
from pathlib import Path

import pytest

HACKING = (Path(__file__).resolve().parent.parent / "HACKING.md").read_text()
LIFE = HACKING.split("## Life of a message", 1)[1].split("\n## ", 1)[0]
# `module.name` or `module.Class.name` in backquotes, where module is one of the package's
NAMES = sorted(set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", LIFE)))
MODULES = {p.stem for p in (Path(__file__).resolve().parent.parent / "sendmail_shim").glob("*.py")}


def test_the_section_names_functions():
    assert len([n for n in NAMES if n.split(".")[0] in MODULES]) >= 30


@pytest.mark.parametrize("name", [n for n in NAMES if n.split(".")[0] in MODULES])
def test_every_named_function_exists(name):
    module, *path = name.split(".")
    target = importlib.import_module(f"sendmail_shim.{module}")
    for part in path:
        assert hasattr(target, part), f"HACKING.md names {name}, which does not exist"
        target = getattr(target, part)
    assert callable(target), f"HACKING.md names {name}, which is not a function or class"
