"""The run config: every component's settings composed into one tree, loaded from YAML + overrides.

Order of precedence: dataclass defaults, then the YAML file, then dotted CLI
overrides (``model.llm.dtype=bf16``). ``load_config`` reports every problem at
once, naming the key and the file, before any model is loaded. The resolved
config is what ``dump_config`` writes into the run directory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmdist.atomic import write_text_atomic
from mmdist.config.capacity import image_token_problems
from mmdist.config.quantization import quantization_problems
from mmdist.config.qwen1 import qwen1_max_len_problem
from mmdist.config.recipes import recipe_path
from mmdist.data.settings import DataConfig
from mmdist.models.settings import ModelConfig
from mmdist.settings import ConfigError, Problem, SettingsBase, from_dict, setting, to_dict
from mmdist.stages import FUSE, Stage
from mmdist.training.settings import CheckpointConfig, EngineConfig, LogConfig, TrainConfig, WatchdogConfig


@dataclass
class RunConfig(SettingsBase):
    """One training run of one stage."""

    stage: Stage = setting(FUSE, "'align' (stage 1: image encoder vs text encoder) or 'fuse' (stage 2: into the LLM)")
    name: str = setting("run", "run name used in logs")
    run_dir: str = setting("runs/run", "folder for the resolved config, logs, checkpoints and exports")
    model: ModelConfig = setting(doc="backbones and connectors", factory=ModelConfig)
    data: DataConfig = setting(doc="data pipeline", factory=DataConfig)
    train: TrainConfig = setting(doc="optimisation", factory=TrainConfig)
    engine: EngineConfig = setting(doc="DeepSpeed engine", factory=EngineConfig)
    checkpoint: CheckpointConfig = setting(doc="checkpoints and export", factory=CheckpointConfig)
    log: LogConfig = setting(doc="metrics and console output", factory=LogConfig)
    watchdog: WatchdogConfig = setting(
        doc="hang detection: stack dump and exit when no step finishes in time", factory=WatchdogConfig
    )

    def check(self) -> list[tuple[str, str]]:
        llm, staged = self.model.llm, isinstance(self.stage, Stage)  # not staged: an unknown name, reported already
        out = self.stage.check(self.model, self.data) if staged else []
        if not self.data.train:
            out.append(("data.train", "needs at least one source (shards)"))
        if not staged:
            return out
        out += quantization_problems(self)
        out += image_token_problems(self)
        if self.stage.builds("llm") and llm.name_or_path and not llm.gguf_file:
            # Local folders and cached/known hub configs only: validation never reaches the network.
            problem = qwen1_max_len_problem(llm.name_or_path, self.data.max_len)
            if problem is not None:
                out.append(("data.max_len", problem))
        return out


# ---------------------------------------------------------------------------
# loading


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b.c=value`` strings; values are read as YAML (numbers, bools, lists)."""
    parsed = []
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "override must look like key.path=value", "command line"))
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip().split("."), value))
    if problems:
        raise ConfigError(problems)
    return parsed


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem("", f"config file not found: {path}", str(path))])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("", f"not valid YAML: {exc}", str(path))]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "top level must be a mapping", str(path))])
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """Defaults, then the YAML at ``path`` (or ``base``), then dotted ``overrides``; validated.

    A ``path`` like ``configs/fuse.yaml`` that is not there relative to the working
    directory is the recipe of that name shipped with mmdist (:func:`recipe_path`).
    """
    if path and base is None:
        path = recipe_path(path)
    data = copy.deepcopy(base) if base is not None else (read_yaml(path) if path else {})
    source = str(path) if path else "defaults"
    for keys, value in parse_overrides(overrides):
        _apply(data, keys, value)
    if overrides:
        source += " + command line"
    return from_dict(RunConfig, data, source=source)


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as a plain dict."""
    return to_dict(cfg)


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
