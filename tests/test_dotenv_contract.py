"""config.py reads dotenv files with python-dotenv's internal `dotenv.parser` (issue 17): a
python-dotenv whose parser is not the tested one must stop the program with one clear line before
anything is accepted, never misread a configuration file. The installed one (the venv's, or
Debian's under `make test-debian`) must pass the same check."""

import os

import pytest

EX_CONFIG = 78
BINDING = "from typing import NamedTuple\nOriginal = NamedTuple('Original', [('string', str), ('line', int)])\n"

# what a future python-dotenv might ship as dotenv/parser.py (None: no parser module at all)
PARSERS = {
    "parse_stream renamed": BINDING + "Binding = NamedTuple('Binding', [('key', str), ('value', str), "
                                      "('original', Original), ('error', bool)])\ndef parse(stream): return iter(())\n",
    "Binding without error": BINDING + "Binding = NamedTuple('Binding', [('key', str), ('value', str), "
                                       "('original', Original)])\ndef parse_stream(stream): return iter(())\n",
    "no parser module": None,
}


@pytest.mark.e2e
@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_an_untested_dotenv_parser_is_one_clear_error(shim, tmp_path, parser):
    package = tmp_path / "site" / "dotenv"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if parser is not None:
        (package / "parser.py").write_text(parser)
    where = package / "parser.py" if parser is not None else "not installed"
    result = shim.run("-odq", "-i", "bob@example.org", stdin=b"Subject: hi\n\nhello\n", expect_exit=EX_CONFIG,
                      env={"PYTHONPATH": str(tmp_path / "site")})
    assert result.stderr == (f"sendmail-shim: python-dotenv's parser ({where}) is not the one sendmail-shim was "
                             "tested with: install python-dotenv >= 0.21, < 2\n")
    assert not os.path.exists(shim.queue_dir / "queue") or os.listdir(shim.queue_dir / "queue") == []

    shim.run("-odq", "-i", "bob@example.org", stdin=b"Subject: hi\n\nhello\n")  # the installed one passes
    assert len(os.listdir(shim.queue_dir / "queue")) == 1
