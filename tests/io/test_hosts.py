"""``p2pd containerd-config``: the containerd ``hosts.toml`` files, through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2pd.hosts import MARKER, render_hosts_toml

MIRROR = "http://127.0.0.1:5001"
FOREIGN = 'server = "https://registry.example"\n\n[host."https://other-mirror.example"]\n' \
          '  capabilities = ["pull"]\n'


def containerd_config(hosts_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PD_")}
    return subprocess.run(
        [sys.executable, "-m", "p2pd", "containerd-config", "--hosts-dir", str(hosts_dir),
         *args],
        capture_output=True, text=True, timeout=30, env=env,
    )


def ok(hosts_dir: Path, *args: str) -> str:
    result = containerd_config(hosts_dir, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def hosts_toml(hosts_dir: Path, registry: str) -> dict[str, Any]:
    return tomllib.loads((hosts_dir / registry / "hosts.toml").read_text())


def assert_mirror(doc: dict[str, Any], mirror: str = MIRROR) -> None:
    assert list(doc["host"]) == [mirror]
    assert doc["host"][mirror]["capabilities"] == ["pull", "resolve"]


def test_writes_a_hosts_toml_with_server_and_mirror(tmp_path: Path) -> None:
    out = ok(tmp_path, "--registry", "127.0.0.1:5000", "--mirror", "http://127.0.0.1:6001/")
    path = tmp_path / "127.0.0.1:5000" / "hosts.toml"
    assert str(path) in out
    doc = hosts_toml(tmp_path, "127.0.0.1:5000")
    assert doc["server"] == "https://127.0.0.1:5000"
    assert_mirror(doc, "http://127.0.0.1:6001")  # no trailing slash: containerd adds /v2
    assert set(doc) == {"server", "host"}
    assert MARKER in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["hosts.toml"]  # no temporary left


def test_docker_io_falls_back_to_registry_1(tmp_path: Path) -> None:
    ok(tmp_path, "--registry", "docker.io")
    doc = hosts_toml(tmp_path, "docker.io")
    assert doc["server"] == "https://registry-1.docker.io"
    assert_mirror(doc)


def test_server_flag_sets_the_fallback(tmp_path: Path) -> None:
    ok(tmp_path, "--registry", "127.0.0.1:5000", "--server", "http://127.0.0.1:5000")
    assert hosts_toml(tmp_path, "127.0.0.1:5000")["server"] == "http://127.0.0.1:5000"


def test_default_has_no_server_line(tmp_path: Path) -> None:
    ok(tmp_path, "--registry", "_default")
    text = (tmp_path / "_default" / "hosts.toml").read_text()
    assert "server" not in text
    doc = tomllib.loads(text)
    assert "server" not in doc
    assert_mirror(doc)


def test_several_registries_at_once(tmp_path: Path) -> None:
    registries = ["docker.io", "quay.io", "127.0.0.1:5000", "_default"]
    ok(tmp_path, *[arg for r in registries for arg in ("--registry", r)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(registries)
    for registry in registries:
        assert_mirror(hosts_toml(tmp_path, registry))
    assert hosts_toml(tmp_path, "quay.io")["server"] == "https://quay.io"

    ok(tmp_path, "--remove", *[arg for r in registries for arg in ("--registry", r)])
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_hosts_toml_unless_forced(tmp_path: Path) -> None:
    foreign = tmp_path / "docker.io" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_text(FOREIGN)
    result = containerd_config(tmp_path, "--registry", "docker.io")
    assert result.returncode != 0
    assert result.stderr.startswith("p2pd: ") and "--force" in result.stderr
    assert foreign.read_text() == FOREIGN

    ok(tmp_path, "--registry", "docker.io", "--force")
    doc = hosts_toml(tmp_path, "docker.io")
    assert doc["server"] == "https://registry-1.docker.io"
    assert_mirror(doc)


def test_rewrites_its_own_file(tmp_path: Path) -> None:
    ok(tmp_path, "--registry", "docker.io", "--mirror", "http://127.0.0.1:5001")
    ok(tmp_path, "--registry", "docker.io", "--mirror", "http://127.0.0.1:7001")
    assert_mirror(hosts_toml(tmp_path, "docker.io"), "http://127.0.0.1:7001")


def test_remove_deletes_only_its_own_file(tmp_path: Path) -> None:
    ok(tmp_path, "--registry", "docker.io", "--registry", "quay.io")
    unrelated = tmp_path / "quay.io" / "ca.crt"
    unrelated.write_text("certificate")
    foreign = tmp_path / "ghcr.io" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_text(FOREIGN)

    out = ok(tmp_path, "--remove", "--registry", "docker.io", "--registry", "quay.io",
             "--registry", "ghcr.io", "--registry", "gcr.io")
    assert "nothing of p2pd's for ghcr.io" in out
    assert not (tmp_path / "docker.io").exists()  # emptied directory goes too
    assert not (tmp_path / "quay.io" / "hosts.toml").exists()
    assert unrelated.read_text() == "certificate"
    assert foreign.read_text() == FOREIGN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ghcr.io", "quay.io"]


@pytest.mark.parametrize("args", [
    ["--registry", "Not A Host"],
    ["--registry", "../etc"],
    ["--registry", "docker.io", "--mirror", "127.0.0.1:5001"],
    ["--registry", "docker.io", "--mirror", 'http://127.0.0.1:5001"]\nx = ["'],
    ["--registry", "docker.io", "--server", "registry.example"],
    ["--registry", "docker.io", "--server", 'https://a" b'],
    ["--remove", "--registry", "../etc"],
], ids=["bad-host", "traversal", "mirror-scheme", "mirror-quote", "server-scheme",
        "server-quote", "remove-traversal"])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path: Path, args: list[str]) -> None:
    hosts_dir = tmp_path / "hosts"
    hosts_dir.mkdir()
    result = containerd_config(hosts_dir, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("p2pd: ") and len(result.stderr.splitlines()) == 1
    assert list(hosts_dir.iterdir()) == []


@pytest.mark.parametrize("registry", ["docker.io", "_default", "[::1]:5000"])
@pytest.mark.parametrize("server", [None, "https://r.example:8443/path?x=1&y=%22"])
def test_rendered_text_is_valid_toml(registry: str, server: str | None) -> None:
    doc = tomllib.loads(render_hosts_toml(registry, "https://m.example:5001/", server))
    assert_mirror(doc, "https://m.example:5001")
    if server is not None:
        assert doc["server"] == server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_hold_keeps_the_files_for_the_life_of_the_process(tmp_path: Path, sig: int) -> None:
    foreign = tmp_path / "ghcr.io" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_text(FOREIGN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pd", "containerd-config", "--hosts-dir", str(tmp_path),
         "--registry", "docker.io", "--registry", "_default", "--hold"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all(line.startswith("wrote ") for line in lines), lines
        time.sleep(0.3)
        assert proc.poll() is None  # still holding
        assert_mirror(hosts_toml(tmp_path, "docker.io"))
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "removed" in out and not (tmp_path / "docker.io").exists()
    assert not (tmp_path / "_default").exists()
    assert foreign.read_text() == FOREIGN  # never touched


def test_hold_and_remove_do_not_go_together(tmp_path: Path) -> None:
    result = containerd_config(tmp_path, "--registry", "docker.io", "--hold", "--remove")
    assert result.returncode == 2 and "--hold" in result.stderr
