"""Each data setting is declared once (capsdist.data.settings): the modules' signatures and docstrings, the CLI's
flags and help, the range checks and the resume rule all read that one table."""

from __future__ import annotations

import inspect

import pytest
from jsonargparse import ArgumentParser

from capsdist.core.rules import ConfigError
from capsdist.data.modules import SOURCES, CapsDataModule
from capsdist.data.settings import DATA_RULES, FREE_ON_RESUME, SETTINGS, names_of


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_each_module_takes_exactly_its_sources_settings_with_the_tables_defaults(source: str) -> None:
    params = inspect.signature(SOURCES[source].__init__).parameters
    assert [n for n in params if n != "self"] == names_of(source)
    assert all(params[n].default == SETTINGS[n].default for n in names_of(source))
    doc = SOURCES[source].__init__.__doc__
    assert all(f"    {n}: {SETTINGS[n].help}" in doc for n in names_of(source))


def test_the_cli_flags_and_help_come_from_the_table() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(CapsDataModule, "data")
    text = parser.format_help()
    for name, setting in SETTINGS.items():
        assert f"--data.{name}" in text
        assert " ".join(setting.help.split()[:4]) in " ".join(text.split()), name
    parsed = parser.parse_args(["--data.source", "multimnist_onthefly", "--data.batch_size", "7"])
    module = CapsDataModule(**parsed.data.as_dict())
    assert type(module).__name__ == "OnTheFlyData" and module.batch_size == 7 and module.num_workers == 0


def test_ranges_and_the_resume_rule_read_the_table() -> None:
    assert set(DATA_RULES) == {n for n, s in SETTINGS.items() if s.rule is not None}
    assert {"batch_size", "max_shift", "num_workers"} <= set(DATA_RULES)
    assert "batch_size" not in FREE_ON_RESUME and "num_workers" in FREE_ON_RESUME
    with pytest.raises(ConfigError, match="--data.max_shift 5 is out of range"):
        CapsDataModule(source="mnist", max_shift=5)
    with pytest.raises(TypeError, match="does not read: train_shards"):
        SOURCES["mnist"](train_shards="x")




