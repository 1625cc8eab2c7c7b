"""The one settings object: validation, and CLI / environment / library parity."""

from __future__ import annotations

from dataclasses import fields

import pytest

import prefork
from prefork.cli import run
from prefork.config import LIBRARY_SETTINGS, SOCKETSERVER_ATTRIBUTES, Config, env_var, flag_name


def test_every_field_is_exactly_one_cli_option_with_its_env_var() -> None:
    # Arguments and actions are not settings: MODULE:OBJECT, --print-config.
    options = {
        p.name: p for p in run.params if p.name not in ("target", "print_config", "check_config")
    }
    assert set(options) == {f.name for f in fields(Config)}
    for f in fields(Config):
        option = options[f.name]
        assert f"--{flag_name(f)}" in option.opts
        assert option.envvar == env_var(f) == "PREFORK_" + flag_name(f).upper().replace("-", "_")


def test_library_settings_are_mixin_class_attributes() -> None:
    defaults = Config()
    for name in set(LIBRARY_SETTINGS) - SOCKETSERVER_ATTRIBUTES:
        assert getattr(prefork.PreForkMixIn, name) == getattr(defaults, name)
    # socketserver's own (ForkingMixIn.max_children) are left to the server's bases.
    for name in SOCKETSERVER_ATTRIBUTES:
        assert name in LIBRARY_SETTINGS and not hasattr(prefork.PreForkMixIn, name)
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
        ({"binds": ("a", 1)}, "binds must be a tuple of a string"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"umask": "089"}, "umask must be an octal mode such as 660 or 027, got '089'"),
        ({"socket_mode": 660}, "socket_mode must be a string or None, got 660"),
        ({"access_log": 1}, "access_log must be a string or None"),
        ({"reload": "on"}, "reload must be true or false"),
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


# -- the config file --------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from prefork.config_file import find_config_file, read_config_file, to_toml  # noqa: E402


def write(tmp_path: Path, text: str, name: str = "prefork.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_keys_are_long_option_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'workers = 3\nbind = ["127.0.0.1:9000", "unix:/run/a.sock"]\n'
        'worker_class = "thread"\ntimeout = 5\nreuse_port = true\n',
    )
    assert read_config_file(path) == {
        "workers": 3,
        "binds": ("127.0.0.1:9000", "unix:/run/a.sock"),
        "worker_class": "thread",
        "worker_timeout": 5,
        "reuse_port": True,
    }
    assert read_config_file(write(tmp_path, 'bind = "udp://127.0.0.1:53"\n')) == {
        "binds": ("udp://127.0.0.1:53",)
    }


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("wrokers = 3\n", "unknown setting 'wrokers'"),
        ("worker_timeout = 3\n", "unknown setting 'worker_timeout'"),  # the key is 'timeout'
        ("config = 'x.toml'\n", "unknown setting 'config'"),
        ('workers = "3"\n', "workers must be an integer, got '3'"),
        ("workers = 0\n", "workers must be at least 1, got 0"),
        ('worker_class = "gevent"\n', "worker_class must be one of"),
        ("bind = [1]\n", "bind must be a tuple of a string"),
        ("workers = [\n", "not valid TOML"),
        ("socket_mode = 660\n", "socket_mode must be a string or None, got 660"),
    ],
)
def test_config_file_errors_name_the_file_and_key(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(prefork.ConfigError) as caught:
        read_config_file(path)
    assert str(caught.value).startswith(f"{path}: ") and complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(prefork.ConfigError, match="cannot read config file .*nope.toml"):
        read_config_file(str(tmp_path / "nope.toml"))


def test_pyproject_table_is_found_only_when_present(tmp_path: Path) -> None:
    assert find_config_file(None, str(tmp_path)) is None
    write(tmp_path, "[project]\nname = 'x'\n", "pyproject.toml")
    assert find_config_file(None, str(tmp_path)) is None
    path = write(tmp_path, "[tool.prefork]\nworkers = 5\n", "pyproject.toml")
    assert find_config_file(None, str(tmp_path)) == (path, ("tool", "prefork"))
    assert read_config_file(path, ("tool", "prefork")) == {"workers": 5}
    assert find_config_file("given.toml", str(tmp_path)) == ("given.toml", ())


@pytest.mark.parametrize(
    "text",
    [
        "[tool.prefork]\nworkers = 5\n",
        '[ tool . "prefork" ]\nworkers = 5\n',
        "[tool]\nprefork = { workers = 5 }\n",
        "tool.prefork.workers = 5\n",
        '"tool".prefork.workers = 5\n',
        "tool = { prefork = { workers = 5 } }\n",
        "[tool.other]\n[tool.'prefork']\nworkers = 5\n",
    ],
)
def test_every_spelling_of_the_pyproject_table_is_read(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text + "\n[project]\nname = 'x'\n", "pyproject.toml")
    assert find_config_file(None, str(tmp_path)) == (path, ("tool", "prefork"))
    assert read_config_file(path, ("tool", "prefork"))["workers"] == 5


def test_a_pyproject_that_names_prefork_only_as_a_dependency_is_not_parsed(
    tmp_path: Path,
) -> None:
    # Not valid TOML (the last line): were it parsed, this would raise.
    write(
        tmp_path,
        '[project]\nname = "prefork-app"\ndependencies = ["prefork>=0.1"]\n'
        '[project.scripts]\nprefork = "prefork.__main__:main"\n[tool.ruff]\nline =',
        "pyproject.toml",
    )
    assert find_config_file(None, str(tmp_path)) is None


def test_print_config_output_reads_back_as_the_same_settings(tmp_path: Path) -> None:
    config = Config(
        binds=("127.0.0.1:1", 'unix:/tmp/"q".sock'),
        workers=3,
        name="n\\x",
        worker_timeout=2.5,
        reuse_port=True,
    )
    path = write(tmp_path, to_toml(config))
    assert Config(**read_config_file(path)) == config


from conftest import run_cli  # noqa: E402

from prefork.errors import ConfigError  # noqa: E402
from prefork.identity import parse_mode  # noqa: E402


def test_bad_identity_and_mode_values_are_one_line_from_the_cli(app_dir: Path):
    cases = {
        ("--user", "no-such-user-here"): "Error: unknown user 'no-such-user-here'",
        ("--group", "no-such-group-here"): "Error: unknown group 'no-such-group-here'",
        ("--umask", "089"): "Error: umask must be an octal mode such as 660 or 027, got '089'",
        ("--socket-mode", "rw"): "Error: socket_mode must be an octal mode",
    }
    for args, message in cases.items():
        result = run_cli("run", "apps:Echo", *args, cwd=app_dir)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message), result.stderr
        assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "mode"), [("660", 0o660), ("0660", 0o660), ("0o027", 0o027), ("7", 0o7)]
)
def test_parse_mode_accepts_octal(text: str, mode: int) -> None:
    assert parse_mode("socket_mode", text) == mode


@pytest.mark.parametrize("text", ["", "8", "1777", "0x1f", "-1", "rw-"])
def test_parse_mode_rejects_the_rest(text: str) -> None:
    with pytest.raises(ConfigError, match="socket_mode must be an octal mode"):
        parse_mode("socket_mode", text)
