"""W&B sweep files: the agent's command line for a sample parameter set parses, with our CLI, into
exactly the intended values.

The command is rendered the way ``wandb agent`` renders it (``wandb_agent.py``: the sweep file's
``command`` with ``${env}``, ``${interpreter}`` and ``${args}`` replaced, ``${args}`` built by
``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``), then handed to ``PETLCLI`` with
``--print_config``, which parses and validates everything without building the model or the data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "recipes" / "sweeps"
METHODS = ("linear_probe", "repadapter", "arc", "dyt", "dyn_adapter", "dyn_adapter_dyt")
SWEEP_FILES = sorted(p.name for p in SWEEPS.glob("*.yaml"))
# What each method's sweep must search (the "hyper-parameters that matter").
MUST_SWEEP = {
    "linear_probe": {"lr", "weight_decay"},
    "repadapter": {"lr", "weight_decay", "adapter_dim", "adapter_scale"},
    "arc": {"lr", "weight_decay", "adapter_dim"},
    "dyt": {"lr", "weight_decay", "adapter_dim", "adapter_scale", "target_rate"},
    "dyn_adapter": {"lr", "weight_decay", "adapter_dim", "adapter_scale", "budget"},
    "dyn_adapter_thresholds": {"thresholds"},
    "dyn_adapter_dyt": {"lr", "weight_decay", "adapter_dim", "target_rate", "w_rate", "budget"},
}


def sample_value(spec: dict[str, Any]) -> Any:
    """A value the sweep could propose; never the first listed one, so a change is visible."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][-1]
    dist, lo, hi = spec["distribution"], spec["min"], spec["max"]
    if dist in ("log_uniform_values", "q_log_uniform_values"):
        return math.sqrt(lo * hi)
    if dist == "int_uniform":
        return (lo + hi) // 2 + 1
    if dist in ("uniform", "q_uniform"):
        return lo + (hi - lo) * 0.37
    raise AssertionError(f"distribution {dist!r} not handled by this test")


def render_agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The argv ``wandb agent`` runs for ``params`` (its own rendering code path)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [sweep.get("program", "")]
    sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def test_every_method_has_a_sweep() -> None:
    missing = [m for m in METHODS if f"{m}.yaml" not in SWEEP_FILES]
    assert not missing, f"no sweep file for {missing} in {SWEEPS}"


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_file_is_well_formed(name: str) -> None:
    sweep = yaml.safe_load((SWEEPS / name).read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize") and "/" in sweep["metric"]["name"]
    command = [str(c) for c in sweep["command"]]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "petl_lightning", "fit"]
    assert command[-1] == "${args}"
    recipes = [command[i + 1] for i, c in enumerate(command) if c == "-c"]
    assert recipes[-1] == "recipes/loggers/wandb.yaml"
    for recipe in recipes:
        assert (REPO / recipe).is_file(), f"{name}: {recipe} does not exist"
    params = sweep["parameters"]
    swept = {key.rsplit(".", 1)[-1] for key in params}
    stem = name.removesuffix(".yaml")
    assert MUST_SWEEP.get(stem, set()) <= swept, f"{name} lacks {MUST_SWEEP[stem] - swept}"
    for key, spec in params.items():
        assert key.startswith(("model.init_args.", "data.init_args.", "trainer.")), key
        kinds = [k for k in ("value", "values", "distribution") if k in spec]
        assert len(kinds) == 1, f"{name}: {key} needs exactly one of value/values/distribution"
        if sweep["method"] == "grid":
            assert kinds[0] != "distribution", f"{name}: grid search needs listed values for {key}"
        if kinds[0] == "distribution":
            assert spec["min"] < spec["max"]
        if kinds[0] in ("value", "values"):
            listed = [spec["value"]] if "value" in spec else spec["values"]
            # The agent renders None as "None", which the CLI rejects: fixed nulls belong in `command`.
            assert None not in listed, f"{name}: {key} lists null; put it in `command` as =null"


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_agent_command_parses_into_intended_values(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from petl_lightning.cli import PETLCLI

    sweep = yaml.safe_load((SWEEPS / name).read_text())
    params = {key: sample_value(spec) for key, spec in sweep["parameters"].items()}
    argv = render_agent_command(sweep, params)
    assert argv[:5] == ["/usr/bin/env", "python", "-m", "petl_lightning", "fit"]
    for key, value in params.items():
        assert f"--{key}={value}" in argv  # what ${args} expands to

    monkeypatch.chdir(REPO)  # the agent runs from the repository root (relative recipe paths)
    with pytest.raises(SystemExit) as exc:
        PETLCLI(args=[*argv[4:], "--print_config"])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), out
    cfg = yaml.safe_load(out)
    for key, value in params.items():
        parsed = lookup(cfg, key)
        assert same(parsed, value), f"{name}: {key} parsed as {parsed!r}, intended {value!r}"
    # The fixed flags of the command hold too; W&B is the logger.
    assert cfg["data"]["init_args"]["protocol"] == "train_val"
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    for flag in (a for a in argv if a.startswith("--") and "=" in a and a[2:].split("=")[0] not in params):
        key, raw = flag[2:].split("=", 1)
        assert same(lookup(cfg, key), yaml.safe_load(raw)), f"{name}: fixed flag {flag} did not hold"
