"""deploy/daemonset.yaml stays in step with what `p2pd run` accepts."""

from __future__ import annotations

import re
from pathlib import Path

from p2pd.cli import build_parser
from p2pd.config import load_run_config

DAEMONSET = Path(__file__).parents[2] / "deploy" / "daemonset.yaml"


def test_the_configmap_config_loads_with_the_container_flags(tmp_path: Path) -> None:
    text = DAEMONSET.read_text()
    block = re.search(r"p2pd\.toml: \|\n((?:    .*\n)+)", text)
    assert block is not None
    config_file = tmp_path / "p2pd.toml"
    config_file.write_text("\n".join(line[4:] for line in block.group(1).splitlines()))
    command = re.search(r'command: \["p2pd", "run", (.*?)\]', text, re.S)
    assert command is not None
    flags = [f.strip().strip('"') for f in command.group(1).replace("\n", " ").split(",")]
    flags = [f.replace("$(POD_IP)", "10.0.0.7").replace("$(NODE_NAME)", "node-7")
             for f in flags]
    flags[flags.index("--config") + 1] = str(config_file)
    config = load_run_config(build_parser().parse_args(["run", *flags]), environ={})
    assert config.mirror_listen == ("127.0.0.1", 5001)
    assert config.peer_listen == ("0.0.0.0", 7000)
    assert config.advertise == "10.0.0.7:7000"
    assert config.peers is not None and config.peers.startswith("dns:")
    assert "containerPort: 5001" in text and "containerPort: 7000" in text
    assert "path: /healthz" in text
