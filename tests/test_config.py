"""The one settings object: validation, and CLI / environment / library parity."""

from __future__ import annotations

from dataclasses import fields

import pytest

import prefork
from prefork.cli import run
from prefork.config import LIBRARY_SETTINGS, Config, env_var, flag_name


def test_every_field_is_exactly_one_cli_option_with_its_env_var() -> None:
    options = {p.name: p for p in run.params if p.name != "target"}
    assert set(options) == {f.name for f in fields(Config)}
    for f in fields(Config):
        option = options[f.name]
        assert f"--{flag_name(f)}" in option.opts
        assert option.envvar == env_var(f) == "PREFORK_" + flag_name(f).upper().replace("-", "_")


def test_library_settings_are_mixin_class_attributes() -> None:
    defaults = Config()
    for name in LIBRARY_SETTINGS:
        assert getattr(prefork.PreForkMixIn, name) == getattr(defaults, name)
    # What the server's bases decide, or what only a process owner sets, is CLI-only.
    assert set(LIBRARY_SETTINGS).isdisjoint({"binds", "worker_class", "chdir", "log_level", "pid"})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"workers": "2"}, "workers must be an integer, got '2'"),
        ({"workers": True}, "workers must be an integer, got True"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"backlog": 0}, "backlog must be at least 1"),
        ({"worker_class": "gevent"}, "worker_class must be one of 'sync', 'thread', 'fork'"),
        ({"graceful_timeout": -0.5}, "graceful_timeout must be at least 0"),
        ({"worker_timeout": "soon"}, "worker_timeout must be a number"),
        ({"max_requests": -1}, "max_requests must be at least 0"),
        ({"reuse_port": "yes"}, "reuse_port must be true or false"),
        ({"binds": ()}, "binds must name at least one address"),
        ({"binds": ("a", 1)}, "binds must be a tuple of a string"),
        ({"log_level": "loud"}, "log_level must be one of"),
    ],
)
def test_impossible_values_raise_config_error_naming_the_setting(settings, message) -> None:
    with pytest.raises(prefork.ConfigError, match=message):
        Config(**settings)


def test_floats_accept_integers() -> None:
    assert Config(graceful_timeout=5).graceful_timeout == 5


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]
