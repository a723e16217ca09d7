"""Unit tests of ccexec.config: the shipped ini, overrides, validation, state dir."""

from __future__ import annotations

import dataclasses
import os
import socket
from importlib import resources

import pytest

from ccexec import config
from ccexec.config import ConfigError, Settings
from support import ROOT

SHIPPED_INI = ROOT / "etc" / "ccexec.ini"


@pytest.fixture(autouse=True)
def plain_state_env(monkeypatch, tmp_path):
    """No systemd/XDG state variables leak in from the environment running the tests."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def _packaged_ini_path() -> str:
    return str(resources.files("ccexec").joinpath("ccexec.ini"))


# ------------------------------------------------------------------ shipped file


@pytest.mark.parametrize("source", ["builtin", "packaged-path", "etc-path"])
def test_shipped_ini_yields_the_dataclass_defaults(source):
    path = {"builtin": None, "packaged-path": _packaged_ini_path(), "etc-path": str(SHIPPED_INI)}[source]
    settings = config.settings_from_ini(config.read_ini(path))
    expected = dataclasses.replace(Settings(), state_dir=config.default_state_dir(),
                                   workdir=os.getcwd(), node_name=socket.gethostname())
    assert settings == expected


def test_shipped_ini_resolves_state_dir_and_workdir_to_absolute_paths():
    settings = config.settings_from_ini(config.read_ini(None))
    assert os.path.isabs(settings.state_dir) and os.path.isabs(settings.workdir)
    assert settings.run_dir == os.path.join(settings.state_dir, "run")
    assert settings.jobs_dir == os.path.join(settings.state_dir, "jobs")


def test_packaged_copy_and_etc_copy_are_identical():
    assert config.default_config_text() == SHIPPED_INI.read_text()


# ------------------------------------------------------------------ overrides


def test_overrides_win_over_the_file(tmp_path):
    ini = config.read_ini(str(SHIPPED_INI))
    state = tmp_path / "elsewhere"
    config.apply_overrides(ini, host="0.0.0.0", port=9123, handlers=5, executors=7,
                           state_dir=str(state), log_level="debug")
    settings = config.settings_from_ini(ini)
    assert (settings.host, settings.port, settings.handlers, settings.executors) == ("0.0.0.0", 9123, 5, 7)
    assert settings.state_dir == str(state)
    assert settings.log_level == "debug"


def test_overrides_left_none_keep_the_file_values(tmp_path):
    ini = config.read_ini(None)
    config.apply_overrides(ini, port=9124)
    settings = config.settings_from_ini(ini)
    defaults = Settings()
    assert settings.port == 9124
    assert (settings.host, settings.handlers, settings.executors, settings.log_level) == (
        defaults.host, defaults.handlers, defaults.executors, defaults.log_level)


def test_overrides_create_missing_sections(tmp_path):
    path = tmp_path / "empty.ini"
    path.write_text("")
    ini = config.read_ini(str(path))
    config.apply_overrides(ini, host="127.0.0.2", handlers=3)
    settings = config.settings_from_ini(ini)
    assert settings.host == "127.0.0.2" and settings.handlers == 3


# ------------------------------------------------------------------ bad values


def _settings_with(section: str, key: str, value: str) -> Settings:
    ini = config.read_ini(None)
    ini.set(section, key, value)
    return config.settings_from_ini(ini)


@pytest.mark.parametrize("section, key, value", [
    (config.SOCKET_SECTION, "port", "0"),
    (config.SOCKET_SECTION, "port", "70000"),
    ("watcher:handler", "numprocesses", "x"),
    ("ccexec", "heartbeat_interval", "5"),
    ("ccexec", "heartbeat_interval", "26"),
    ("ccexec", "log_level", "loud"),
    ("ccexec", "env_set", "PYTHONUNBUFFERED"),
    ("ccexec", "job_nice", "-1"),
    ("ccexec", "job_nice", "20"),
    ("ccexec", "env_set", "A=\"unclosed"),
    ("ccexec", "labels", "site='eu"),
    ("ccexec", "heartbeat_interval", "nan"),
    ("ccexec", "kill_grace", "nan"),
    ("ccexec", "stall_timeout", "NaN"),
    ("ccexec", "max_requests_per_second", "nan"),
])
def test_bad_value_raises_config_error_naming_the_key(section, key, value):
    with pytest.raises(ConfigError) as error:
        _settings_with(section, key, value)
    assert key in str(error.value)


def test_bad_values_through_overrides_name_the_key():
    for overrides, key in (({"port": 0}, "port"), ({"port": 70000}, "port"),
                           ({"handlers": "x"}, "numprocesses"), ({"log_level": "loud"}, "log_level")):
        ini = config.read_ini(None)
        config.apply_overrides(ini, **overrides)
        with pytest.raises(ConfigError, match=key):
            config.settings_from_ini(ini)


@pytest.mark.parametrize("value", ["6", "25", "15.5"])
def test_heartbeat_interval_bounds_are_inclusive(value):
    assert _settings_with("ccexec", "heartbeat_interval", value).heartbeat_interval == float(value)


def test_env_set_parses_name_value_pairs():
    settings = _settings_with("ccexec", "env_set", "A=1 'B=two words' C=")
    assert settings.env_set == {"A": "1", "B": "two words", "C": ""}


@pytest.mark.parametrize("endpoint, address", [("tcp://10.0.0.1:8005", ("10.0.0.1", 8005)),
                                               ("tcp://*:8005", ("0.0.0.0", 8005)),
                                               ("tcp://[::1]:8005", ("::1", 8005))])
def test_remote_listen_address(endpoint, address):
    assert config.remote_listen_address(endpoint) == address


def test_labels_parse_as_name_value_pairs():
    assert _settings_with("ccexec", "labels", "gpu=a100 site=eu-1").labels == {"gpu": "a100", "site": "eu-1"}


@pytest.mark.parametrize("value", ["gpu", "gpu=a b", "=x", "gpu=a/b"])
def test_bad_labels_name_the_key(value):
    with pytest.raises(ConfigError, match="labels"):
        _settings_with("ccexec", "labels", value)


@pytest.mark.parametrize("settings, message", [
    ({"role": "worker"}, "role must be one of"),
    ({"role": "executor"}, "needs [ccexec] broker"),
    ({"role": "executor", "broker": "ipc:///tmp/x"}, "needs [ccexec] broker = tcp://"),
    ({"role": "executor", "broker": "tcp://h:1"}, "curve_secret_key"),
    ({"role": "executor", "broker": "tcp://h:1", "curve_secret_key": "/k"}, "curve_server_key"),
    ({"remote_listen": "10.0.0.1:8005"}, "remote_listen must be tcp://"),
    ({"remote_listen": "tcp://10.0.0.1"}, "remote_listen must be tcp://"),
    ({"remote_listen": "tcp://:8005"}, "remote_listen must be tcp://"),
    ({"remote_listen": "tcp://10.0.0.1:70000"}, "remote_listen must be tcp://"),
    ({"remote_listen": "tcp://10.0.0.1:8005"}, "curve_clients"),
])
def test_remote_links_need_tcp_and_their_keys(settings, message):
    ini = config.read_ini(None)
    for key, value in settings.items():
        ini.set("ccexec", key, value)
    with pytest.raises(ConfigError) as error:
        config.settings_from_ini(ini)
    assert message in str(error.value)


# ------------------------------------------------------------------ state dir


def test_default_state_dir_honours_state_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/sd1:{tmp_path}/sd2")
    assert config.default_state_dir() == f"{tmp_path}/sd1"


def test_default_state_dir_honours_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert config.default_state_dir() == str(tmp_path / "xdg" / "ccexec")


def test_state_directory_wins_over_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd"))
    assert config.default_state_dir() == str(tmp_path / "systemd")


def test_default_state_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.default_state_dir() == str(tmp_path / ".local" / "state" / "ccexec")


def test_empty_state_dir_in_file_uses_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd"))
    assert config.settings_from_ini(config.read_ini(None)).state_dir == str(tmp_path / "systemd")


# ------------------------------------------------------------------ missing file


def test_missing_config_file_raises_config_error(tmp_path):
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError, match="cannot read config") as error:
        config.read_ini(str(missing))
    assert str(missing) in str(error.value)


def test_unparsable_config_file_raises_config_error(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("no section header here\n")
    with pytest.raises(ConfigError, match="bad config"):
        config.read_ini(str(path))
