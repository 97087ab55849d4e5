"""Facts about ClaudeCluster read from its sources, for the deployment checks.

The deployment files must agree with the code: the environment variables the
processes read, the binaries the workspace builds, the stream and consumer
names the workers pull from, and the user the image runs as. Rather than
restating those here, they are read from the Rust sources, the Cargo
manifests, broker-config/ and the Dockerfile each time the checks run.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Directories never scanned for sources.
SKIP_DIRS = {"target", "node_modules", ".git"}


@dataclass
class Facts:
    """What the deployment files are checked against."""

    root: Path
    # Flat environment variable names from engine/src/config.rs ENV_ALIASES.
    env_aliases: list[str] = field(default_factory=list)
    # Every UPPER_SNAKE string literal in the Rust sources: names read with
    # std::env::var, clap `env = ...`, the claude executor's allow-list.
    rust_literals: set[str] = field(default_factory=set)
    executor_kinds: set[str] = field(default_factory=set)
    log_formats: set[str] = field(default_factory=set)
    bands: list[str] = field(default_factory=list)
    stream: str = ""
    consumer_prefix: str = ""
    # Names from broker-config/nats/, when present.
    broker_stream: str | None = None
    broker_consumers: set[str] = field(default_factory=set)
    broker_max_payload: str | None = None
    bin_names: set[str] = field(default_factory=set)
    package_names: set[str] = field(default_factory=set)
    member_dirs: list[str] = field(default_factory=list)
    # Repository-relative files that include_str!/include_bytes! embed.
    embedded_files: set[str] = field(default_factory=set)
    dockerfile: str = ""
    dockerignore: list[str] = field(default_factory=list)

    def env_name_known(self, name: str) -> bool:
        """Whether some ClaudeCluster process or the CLI it runs reads `name`."""
        return (
            name in self.env_aliases
            or name in self.rust_literals
            or name.startswith("CLAUDECLUSTER_")
        )

    def band_consumers(self) -> set[str]:
        """The durable consumer names of the three priority bands."""
        return {f"{self.consumer_prefix}-{band}" for band in self.bands}

    def dockerfile_stages(self) -> set[str]:
        """Names of the Dockerfile's build stages."""
        return set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", self.dockerfile))

    def image_uid(self) -> int | None:
        """The numeric user the final images run as (last USER line)."""
        users = re.findall(r"(?m)^USER\s+(\d+)", self.dockerfile)
        return int(users[-1]) if users else None


def _rust_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.rs"):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts):
            files.append(path)
    return files


def _required(pattern: str, text: str, what: str) -> str:
    match = re.search(pattern, text, re.S)
    if not match:
        raise ValueError(f"cannot find {what} in the sources (pattern {pattern!r})")
    return match.group(1)


def _read_config(facts: Facts, root: Path) -> None:
    config = (root / "engine/src/config.rs").read_text()
    aliases = _required(r"ENV_ALIASES[^=]*=\s*&\[(.*?)\];", config, "ENV_ALIASES")
    facts.env_aliases = re.findall(r'\(\s*"([A-Z0-9_]+)"\s*,', aliases)
    facts.executor_kinds = set(re.findall(r'ExecutorKind::\w+\s*=>\s*"(\w+)"', config))
    log_enum = _required(r"pub enum LogFormat\s*\{(.*?)\n\}", config, "LogFormat")
    facts.log_formats = {v.lower() for v in re.findall(r"(?m)^\s*(\w+),\s*$", log_enum)}
    facts.stream = _required(r'\bstream:\s*"([^"]+)"', config, "the default stream name")
    facts.consumer_prefix = _required(
        r'consumer_prefix:\s*"([^"]+)"', config, "the default consumer prefix"
    )
    broker = (root / "engine/src/broker/mod.rs").read_text()
    facts.bands = re.findall(r'PriorityBand::\w+\s*=>\s*"(\w+)"', broker)


def _read_broker_config(facts: Facts, root: Path) -> None:
    nats = root / "broker-config/nats"
    tasks = nats / "stream-tasks.json"
    if tasks.exists():
        facts.broker_stream = json.loads(tasks.read_text()).get("name")
    for path in sorted(nats.glob("consumer-*.json")):
        doc = json.loads(path.read_text())
        name = doc.get("durable_name") or doc.get("name")
        if name:
            facts.broker_consumers.add(name)
    conf = nats / "nats-server.conf"
    if conf.exists():
        match = re.search(r"(?m)^\s*max_payload:\s*(\S+)", conf.read_text())
        facts.broker_max_payload = match.group(1) if match else None


def _read_workspace(facts: Facts, root: Path) -> None:
    manifest = tomllib.loads((root / "Cargo.toml").read_text())
    facts.member_dirs = list(manifest.get("workspace", {}).get("members", []))
    for member in facts.member_dirs:
        member_manifest = tomllib.loads((root / member / "Cargo.toml").read_text())
        facts.package_names.add(member_manifest["package"]["name"])
        for binary in member_manifest.get("bin", []):
            facts.bin_names.add(binary["name"])
        if (root / member / "src/main.rs").exists() and not member_manifest.get("bin"):
            facts.bin_names.add(member_manifest["package"]["name"])


def _read_rust_sources(facts: Facts, root: Path) -> None:
    include = re.compile(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)')
    for path in _rust_files(root):
        text = path.read_text(errors="replace")
        facts.rust_literals.update(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', text))
        for target in include.findall(text):
            embedded = (path.parent / target).resolve()
            try:
                facts.embedded_files.add(str(embedded.relative_to(root.resolve())))
            except ValueError:
                continue


def read_facts(root: Path) -> Facts:
    """Reads every fact from the repository at `root`.

    Raises ValueError when a source no longer has the shape these checks
    expect, so a refactor of the code cannot silently disable a check.
    """
    facts = Facts(root=root)
    _read_config(facts, root)
    _read_broker_config(facts, root)
    _read_workspace(facts, root)
    _read_rust_sources(facts, root)
    facts.dockerfile = (root / "Dockerfile").read_text()
    ignore = root / ".dockerignore"
    if ignore.exists():
        facts.dockerignore = [
            line.strip()
            for line in ignore.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    for what, value in [
        ("ENV_ALIASES", facts.env_aliases),
        ("ExecutorKind names", facts.executor_kinds),
        ("LogFormat variants", facts.log_formats),
        ("PriorityBand names", facts.bands),
        ("workspace binaries", facts.bin_names),
    ]:
        if not value:
            raise ValueError(f"found no {what} in the sources")
    return facts
