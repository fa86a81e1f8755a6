"""``p2pd run`` configuration: flags, ``P2PD_*`` environment, TOML file, defaults."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from p2pd.cli import build_parser
from p2pd.config import (
    RUN_OPTIONS,
    DaemonConfig,
    RegistryConfig,
    load_run_config,
    parse_hostport,
    parse_size,
)
from p2pd.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20


def load(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """``load_run_config`` for ``p2pd run ARGV`` with an explicit environment."""
    args = build_parser().parse_args(["run", *argv])
    return load_run_config(args, environ={} if environ is None else dict(environ))


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p2pd.toml"
    path.write_text(text)
    return path


def toml_value(value: str | list[str]) -> str:
    # JSON strings and arrays of strings are valid TOML values.
    return json.dumps(value)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any P2PD_* variable (for subprocesses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PD_")}
    env.update(extra)
    return env


# -- defaults -----------------------------------------------------------------------


def test_defaults_without_flags_environment_or_file() -> None:
    config = load()
    assert config == DaemonConfig()
    assert config.mirror_listen == ("127.0.0.1", 5001)
    assert config.cache_dir == Path("/var/lib/p2pd")
    assert config.cache_size == 20 * GiB
    assert (config.cache_high, config.cache_low) == (0.90, 0.75)
    assert config.registries == {}
    assert config.default_registry == "docker.io"
    assert config.upstream_timeout == 60.0
    assert config.access_ttl == 300.0
    assert config.log_level == "info"


def test_docker_io_is_served_by_registry_1() -> None:
    config = load()
    assert config.registry("docker.io").endpoint == "https://registry-1.docker.io"
    assert config.registry("quay.io").endpoint == "https://quay.io"
    assert config.registry("127.0.0.1:5000").endpoint == "https://127.0.0.1:5000"


def test_unconfigured_registries_use_the_upstream_timeout() -> None:
    reg = load(["--upstream-timeout", "7"]).registry("quay.io")
    assert reg == RegistryConfig("quay.io", "https://quay.io", read_timeout=7.0)


# -- every option, three ways ---------------------------------------------------------

# option name -> (value as text, what to look at in the config, what it must be)
SAMPLES: dict[str, tuple[str, Callable[[DaemonConfig], Any], Any]] = {
    "mirror-listen": ("0.0.0.0:6000", lambda c: c.mirror_listen, ("0.0.0.0", 6000)),
    "cache-dir": ("/srv/p2pd-cache", lambda c: c.cache_dir, Path("/srv/p2pd-cache")),
    "cache-size": ("10GiB", lambda c: c.cache_size, 10 * GiB),
    "cache-high": ("0.8", lambda c: c.cache_high, 0.8),
    "cache-low": ("0.5", lambda c: c.cache_low, 0.5),
    "registry": ("r.example:5000=http://127.0.0.1:5000/",
                 lambda c: c.registry("r.example:5000").endpoint, "http://127.0.0.1:5000"),
    "registry-ca": ("r.example=/etc/p2pd/ca.pem", lambda c: c.registry("r.example").ca_file,
                    Path("/etc/p2pd/ca.pem")),
    "default-registry": ("quay.io", lambda c: c.default_registry, "quay.io"),
    "upstream-timeout": ("15", lambda c: c.upstream_timeout, 15.0),
    "access-ttl": ("30", lambda c: c.access_ttl, 30.0),
    "log-level": ("DEBUG", lambda c: c.log_level, "debug"),
    "peer-listen": ("0.0.0.0:5002", lambda c: c.peer_listen, ("0.0.0.0", 5002)),
    "advertise": ("10.0.0.7:5002", lambda c: c.advertise, "10.0.0.7:5002"),
    "node-id": ("node-7.example", lambda c: c.node_id, "node-7.example"),
    "cluster-secret-file": ("/etc/p2pd/secret", lambda c: c.cluster_secret_file,
                            Path("/etc/p2pd/secret")),
    "upload-limit": ("100MB/s", lambda c: c.upload_limit, 100_000_000),
    "download-limit": ("1Gbit", lambda c: c.download_limit, 125_000_000),
    "upstream-limit": ("50MiB", lambda c: c.upstream_limit, 50 * (1 << 20)),
    "max-uploads": ("4", lambda c: c.max_uploads, 4),
    "peers": ("static:10.0.0.1:5002,10.0.0.2:5002", lambda c: c.peers,
              "static:10.0.0.1:5002,10.0.0.2:5002"),
}
OPTIONS = {opt.name: opt for opt in RUN_OPTIONS}


def test_the_samples_cover_every_run_option() -> None:
    assert set(SAMPLES) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_option_as_flag_environment_and_file(name: str, tmp_path: Path) -> None:
    opt = OPTIONS[name]
    text, get, expected = SAMPLES[name]
    assert get(load()) != expected, "the sample must differ from the default"

    assert get(load([opt.flag, text])) == expected
    assert get(load(environ={opt.env: text})) == expected
    value = toml_value([text] if opt.repeatable else text)
    config_file = write_toml(tmp_path, f"{opt.name} = {value}\n")
    assert get(load(["--config", str(config_file)])) == expected
    assert get(load(environ={"P2PD_CONFIG": str(config_file)})) == expected


def test_option_names_give_flag_env_and_dest() -> None:
    opt = OPTIONS["cache-size"]
    assert (opt.flag, opt.env, opt.dest) == ("--cache-size", "P2PD_CACHE_SIZE", "cache_size")
    assert OPTIONS["registry-ca"].env == "P2PD_REGISTRY_CA"


# -- precedence: flag > environment > file > default ---------------------------------


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'cache-size = "1GiB"\nlog-level = "error"\n')
    flag = ["--config", str(config_file)]
    env = {"P2PD_CACHE_SIZE": "2GiB"}
    assert load(flag).cache_size == 1 * GiB
    assert load(flag, env).cache_size == 2 * GiB
    assert load([*flag, "--cache-size", "3GiB"], env).cache_size == 3 * GiB
    # Settings from different layers combine.
    both = load([*flag, "--upstream-timeout", "5"], env)
    assert (both.cache_size, both.log_level, both.upstream_timeout) == (2 * GiB, "error", 5.0)


def test_config_flag_beats_p2pd_config_variable(tmp_path: Path) -> None:
    one = tmp_path / "one.toml"
    one.write_text('log-level = "warning"\n')
    two = tmp_path / "two.toml"
    two.write_text('log-level = "error"\n')
    assert load(environ={"P2PD_CONFIG": str(one)}).log_level == "warning"
    assert load(["--config", str(two)], {"P2PD_CONFIG": str(one)}).log_level == "error"


def test_repeatable_option_from_a_higher_layer_replaces_the_lower_one(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'registry = ["a.io=http://file-a", "b.io=http://file-b"]\n')
    flag = ["--config", str(config_file)]
    assert set(load(flag).registries) == {"a.io", "b.io"}
    from_env = load(flag, {"P2PD_REGISTRY": "c.io=http://env-c"})
    assert set(from_env.registries) == {"c.io"}
    from_flag = load([*flag, "--registry", "d.io=http://flag-d"], {"P2PD_REGISTRY": "c.io=x"})
    assert set(from_flag.registries) == {"d.io"}


def test_environment_is_taken_from_the_argument_not_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("P2PD_LOG_LEVEL", "error")
    assert load(environ={}).log_level == "info"
    assert load(environ={"P2PD_LOG_LEVEL": "warning"}).log_level == "warning"


# -- registries ---------------------------------------------------------------------


def test_registry_flag_is_repeatable() -> None:
    config = load(["--registry", "127.0.0.1:5000=http://127.0.0.1:5000",
                   "--registry", "docker.io=https://mirror.example/v2-proxy/",
                   "--registry-ca", "docker.io=/ca.pem"])
    assert config.registry("127.0.0.1:5000").endpoint == "http://127.0.0.1:5000"
    hub = config.registry("docker.io")
    assert hub.endpoint == "https://mirror.example/v2-proxy"
    assert hub.ca_file == Path("/ca.pem")
    assert config.registry("quay.io").endpoint == "https://quay.io"


def test_registry_environment_variable_is_comma_separated() -> None:
    config = load(environ={"P2PD_REGISTRY": "a.io=http://127.0.0.1:1, b.io=http://127.0.0.1:2,",
                           "P2PD_REGISTRY_CA": "a.io=/a.pem"})
    assert set(config.registries) == {"a.io", "b.io"}
    assert config.registry("a.io").endpoint == "http://127.0.0.1:1"
    assert config.registry("a.io").ca_file == Path("/a.pem")
    assert config.registry("b.io").endpoint == "http://127.0.0.1:2"
    assert config.registry("b.io").ca_file is None


def test_registry_tables_in_the_file(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, """
upstream-timeout = 20

[registries."127.0.0.1:5000"]
endpoint = "http://127.0.0.1:5000/"
ca-file = "/etc/ssl/local.pem"
timeout = 5
connect-timeout = 2.5

[registries."quay.io"]
ca-file = "/etc/ssl/quay.pem"
""")
    config = load(["--config", str(config_file)])
    assert config.registry("127.0.0.1:5000") == RegistryConfig(
        "127.0.0.1:5000", "http://127.0.0.1:5000", Path("/etc/ssl/local.pem"), 2.5, 5.0)
    # A table without endpoint or timeout gets the defaults.
    assert config.registry("quay.io") == RegistryConfig(
        "quay.io", "https://quay.io", Path("/etc/ssl/quay.pem"), 10.0, 20.0)


def test_flag_endpoint_overrides_a_file_table_but_keeps_its_other_settings(
    tmp_path: Path,
) -> None:
    config_file = write_toml(tmp_path, '[registries."r.io"]\nendpoint = "https://file.example"\n'
                                       'ca-file = "/ca.pem"\ntimeout = 9\n')
    config = load(["--config", str(config_file), "--registry", "r.io=http://flag.example"])
    assert config.registry("r.io") == RegistryConfig(
        "r.io", "http://flag.example", Path("/ca.pem"), 10.0, 9.0)


@pytest.mark.parametrize("table", [
    'endpiont = "http://127.0.0.1:5000"',  # typo of a key: must not be ignored
    'endpoint = "ftp://127.0.0.1:5000"',
    'timeout = "soon"',
    'timeout = -1',
], ids=["unknown-key", "bad-scheme", "bad-timeout", "negative-timeout"])
def test_bad_registry_tables_are_config_errors(tmp_path: Path, table: str) -> None:
    config_file = write_toml(tmp_path, f'[registries."r.io"]\n{table}\n')
    with pytest.raises(ConfigError):
        load(["--config", str(config_file)])


@pytest.mark.parametrize("text", ['registries = "r.io"', '[registries]\n"r.io" = 5',
                                  '[registries."bad host"]\nendpoint = "http://x"'])
def test_malformed_registries_in_the_file_are_config_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load(["--config", str(write_toml(tmp_path, text + "\n"))])


@pytest.mark.parametrize("argv", [
    ["--registry", "no-equals-sign"],
    ["--registry", "=http://127.0.0.1:5000"],
    ["--registry", "r.io="],
    ["--registry", "r.io=127.0.0.1:5000"],  # no scheme
    ["--registry", "bad host=http://127.0.0.1:5000"],
    ["--registry-ca", "r.io"],
    ["--default-registry", "Not A Host"],
])
def test_bad_registry_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        load(argv)


# -- sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("10GiB", 10 * GiB),
    ("500MB", 500_000_000),
    ("1.5G", 1_500_000_000),
    ("1.5 GiB", 3 * GiB // 2),
    ("64mib", 64 * MiB),
    ("2k", 2000),
    ("4096", 4096),
    ("12b", 12),
    (" 3 TB ", 3 * 1000**4),
])
def test_human_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert load(["--cache-size", text]).cache_size == size


@pytest.mark.parametrize("text", ["", "ten", "10XB", "-1G", "1e9", "1,5G", "G", "0x10",
                                  "0", "0.1"])
def test_invalid_sizes_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        load([f"--cache-size={text}"])  # "=" so that "-1G" is not taken for a flag
    with pytest.raises(ConfigError):
        load(environ={"P2PD_CACHE_SIZE": text})


def test_sizes_in_the_file_may_be_integers(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "cache-size = 1048576\n")
    assert load(["--config", str(config_file)]).cache_size == MiB


@pytest.mark.parametrize("value", ["-5", "0", "true", "1.5e9"])
def test_sizes_in_the_file_that_are_not_byte_counts_are_config_errors(
    tmp_path: Path, value: str,
) -> None:
    with pytest.raises(ConfigError):
        load(["--config", str(write_toml(tmp_path, f"cache-size = {value}\n"))])


# -- other invalid values -------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:5001", ("127.0.0.1", 5001)),
    ("[::1]:5001", ("::1", 5001)),
    ("localhost:0", ("localhost", 0)),
])
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected
    assert load(["--mirror-listen", text]).mirror_listen == expected


@pytest.mark.parametrize("text", ["localhost", "127.0.0.1:", "127.0.0.1:65536",
                                  "127.0.0.1:http", "127.0.0.1:-1", ""])
def test_bad_hostport_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        load(["--mirror-listen", text])


def test_non_string_hostport_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(["--config", str(write_toml(tmp_path, "mirror-listen = 5001\n"))])


@pytest.mark.parametrize("argv", [
    ["--cache-high", "1.5"],
    ["--cache-high", "0"],
    ["--cache-low", "nan"],
    ["--cache-high", "0.5", "--cache-low", "0.6"],
    ["--log-level", "verbose"],
    ["--upstream-timeout", "soon"],
    ["--upstream-timeout", "-1"],
    ["--upstream-timeout", "0"],
    ["--access-ttl", "-5"],
])
def test_invalid_values_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        load(argv)


def test_access_ttl_may_be_zero() -> None:
    assert load(["--access-ttl", "0"]).access_ttl == 0.0


def test_unknown_key_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'cache-size = "1GiB"\ncache_size = "2GiB"\n')
    with pytest.raises(ConfigError, match="cache_size"):
        load(["--config", str(config_file)])


def test_unreadable_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError):
        load(["--config", str(write_toml(tmp_path, "cache-size = \n"))])
    with pytest.raises(ConfigError):
        load(environ={"P2PD_CONFIG": str(tmp_path / "missing.toml")})


# -- the command line -----------------------------------------------------------------


def run_p2pd(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pd", *argv], capture_output=True,
                          text=True, timeout=timeout, env=clean_env(COLUMNS="100"))


def test_run_help_names_every_flag_and_its_environment_variable() -> None:
    result = run_p2pd("run", "--help")
    assert result.returncode == 0
    for opt in RUN_OPTIONS:
        assert opt.flag in result.stdout, opt.name
        assert opt.env in result.stdout, opt.name
    assert "--config" in result.stdout and "P2PD_CONFIG" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("p2pd: "), result.stderr


@pytest.mark.parametrize("argv", [
    ["--cache-size", "lots"],
    ["--cache-size", "0"],
    ["--mirror-listen", "nowhere"],
    ["--default-registry", "bad host"],
    ["--registry", "r.io=ftp://x"],
    ["--config", "/nonexistent/p2pd.toml"],
])
def test_run_with_a_bad_config_exits_2_with_one_line(argv: list[str], tmp_path: Path) -> None:
    result = run_p2pd("run", "--cache-dir", str(tmp_path / "cache"), *argv)
    assert_one_line_error(result)
    assert not (tmp_path / "cache").exists()


def test_run_with_a_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'cache-size = "1GiB"\nbogus = 1\n')
    result = run_p2pd("run", "--config", str(config_file))
    assert_one_line_error(result)
    assert "bogus" in result.stderr


def test_run_with_the_mirror_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_p2pd("run", "--mirror-listen", f"127.0.0.1:{port}",
                          "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(result)


def test_run_with_an_unusable_cache_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_p2pd("run", "--mirror-listen", "127.0.0.1:0",
                      "--cache-dir", str(not_a_dir / "cache"))
    assert_one_line_error(result)
