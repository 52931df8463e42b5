"""The W&B sweep recipe: every point of its grid, expanded as the agent does, is a valid run."""

from __future__ import annotations

import itertools

import yaml

from gblm.config import to_plain, validate
from gblm.paths import PROJECT_ROOT
from tests.conftest import compose_config

RECIPE = PROJECT_ROOT / "experiments" / "wandb_sweep.yaml"


def agent_commands(sweep: dict) -> list[list[str]]:
    """The commands a grid sweep's agent runs: the macros replaced by each point's values."""
    names = list(sweep["parameters"])
    grids = [sweep["parameters"][n]["values"] for n in names]
    commands = []
    for point in itertools.product(*grids):
        args = [f"{n}={v}" for n, v in zip(names, point)]
        command = []
        for part in sweep["command"]:
            if part == "${env}":
                command.append("/usr/bin/env")
            elif part == "${args_no_hyphens}":
                command += args
            else:
                command.append(part)
        commands.append(command)
    return commands


def test_every_grid_point_is_a_valid_gblm_run():
    sweep = yaml.safe_load(RECIPE.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["name"] == "ppl/pruned"
    commands = agent_commands(sweep)
    assert len(commands) == 8
    for command in commands:
        assert command[1:4] == ["python", "-m", "gblm"]
        settings = validate(to_plain(compose_config(*command[4:])))
        assert settings.logger.name == "wandb" and settings.method_name in ("wanda", "gblm")
    point = commands[-1][4:]
    assert "method=gblm" in point and "sparsity.ratio=0.6" in point
