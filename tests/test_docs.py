"""The README documents every configuration key, preset and option the code knows."""

from pathlib import Path

import pytest

from sendmail_shim import config, options, providers

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("key", sorted(config.KEYS))
def test_every_key_documented(key):
    assert f"| `{key}` |" in README


@pytest.mark.parametrize("preset", sorted(providers.PRESETS))
def test_every_preset_documented(preset):
    assert f"| `{preset}` | {providers.PRESETS[preset].host} |" in README


@pytest.mark.parametrize("name", sorted(options.LONG_OPTIONS))
def test_every_long_option_documented(name):
    assert f"--{name}" in README
