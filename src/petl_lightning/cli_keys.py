"""One-line explanations of configuration errors: renamed keys, unknown keys with the closest valid
key, and jsonargparse's nested union messages cut down to the offending key.

jsonargparse reports a bad ``model.init_args`` key as a dump of every union member it tried; the
user needs one line. :func:`explain_parse_error` re-reads what the user gave (``-c`` files and
``--key value`` arguments) and names the first key that is renamed or unknown.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

#: Keys renamed by the redesign (old init argument -> new one; None: removed, with the reason).
RENAMED: dict[str, dict[str, str | None]] = {
    "RepAdapter": {"r": "adapter_dim", "groups": "adapter_groups", "scale": "adapter_scale", "scale_task": None},
    "ARC": {"r": "adapter_dim"},
    "DyT": {
        "variant": "skipping.sites",
        "placement": "skipping.sites",
        "force_keep_rate": "skipping.fixed_keep_rate",
        "bottleneck": "adapter_dim",
        "inference_mode": "skipping.inference",
        **{
            key: f"skipping.{key}"
            for key in (
                "target_rate",
                "tau",
                "threshold",
                "fixed_keep_rate",
                "w_rate",
                "w_complete_cls",
                "w_distill",
                "dispatcher_init_std",
                "dispatcher_lr_scale",
            )
        },
    },
    "DynAdapter": {
        "exit_blocks": "exits.blocks",
        "exit_hidden": "exits.hidden",
        "exit_dropout": "exits.dropout",
        "exit_pool": "exits.pool",
        "exit_grad_scale": "exits.grad_scale",
        "lora_rank": "adapter_dim",
        "arc_rank": "adapter_dim",
        "lora_alpha": "adapter_scale",
        "loss_schedule": "loss.kind",
        "loss_weight_start": "loss.start",
        "loss_weight_end": "loss.end",
        "loss_ramp": "loss.ramp",
        "final_loss_weight": "loss.final_weight",
        "petl_dropout": "sparsity.adapter_dropout",
        "grad_keep": "sparsity.grad_keep",
        "grad_mask_mode": "sparsity.grad_mask_mode",
        "confidence": "calibration.confidence",
        "exit_thresholds": "calibration.thresholds",
        "calibrate_budget": "calibration.budget",
        "calibration_policy": "calibration.policy",
    },
}
REMOVED_WHY = {"scale_task": "leave adapter_scale null and the official scale of data.init_args.task is used"}
#: Fields of option groups renamed: (group class, old field) -> new field.
RENAMED_FIELDS: dict[tuple[str, str], str] = {("TokenSkipping", "placement"): "sites"}
#: Classes a recipe may name that were removed, with what to do instead.
REMOVED_CLASSES = {
    "ExitCalibration": (
        "DynAdapter calibrates its exit thresholds itself (calibration.budget); drop it from trainer.callbacks "
        "(petl_lightning.callbacks.ExitCurveLogger draws the accuracy-vs-GFLOPs curve)"
    ),
}
#: Values renamed by the redesign: (class, key) -> {old value: new value}.
RENAMED_VALUES: dict[tuple[str, str], dict[str, str]] = {
    ("RepAdapter", "placement"): {"repblock": "attn_mlp", "repattn": "attn"},
    ("ARC", "placement"): {"arc": "attn_mlp", "arc_att": "attn"},
}


def import_class(path: str) -> type | None:
    """The class at ``module.Name`` (short names resolve against ``petl_lightning``), or None."""
    import petl_lightning

    if "." not in path:
        return getattr(petl_lightning, path, None)
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and k != "dict_kwargs" else {key: v})
    return out


def _strings(tree: Any) -> list[str]:
    """Every string inside nested lists and dicts (e.g. the class paths of a callbacks list)."""
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [s for v in values for s in _strings(v)]


def user_keys(argv: list[str]) -> dict[str, Any]:
    """Every dotted key the user set, from ``-c`` files then ``--key value`` arguments (later wins)."""
    keys: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = Path(argv[i + 1])
            if path.is_file():
                try:
                    keys.update(_flatten(yaml.safe_load(path.read_text()) or {}))
                except yaml.YAMLError:
                    pass
            i += 2
            continue
        if arg.startswith("--") and arg not in ("--print_config",):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            keys[name] = value
        i += 1
    return keys


def init_arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments a class accepts, following ``**kwargs`` up its bases."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        params.update(
            {n: p for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD and n not in params}
        )
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def _class_of(keys: dict[str, Any], group: str) -> type | None:
    path = keys.get(f"{group}.class_path") or keys.get(group)
    return import_class(path) if isinstance(path, str) else None


def _check_group(keys: dict[str, Any], group: str) -> str | None:
    cls = _class_of(keys, group)
    if cls is None:
        return None
    valid = init_arguments(cls)
    renamed = {old: new for klass in cls.__mro__ for old, new in RENAMED.get(klass.__name__, {}).items()}
    for key, value in keys.items():
        parts = key.split(".")
        if parts[0] != group or len(parts) < 2 or parts[1] == "class_path":
            continue
        rest = parts[2:] if parts[1] == "init_args" else parts[1:]
        if not rest:
            continue
        name, prefix = rest[0], f"{group}.init_args"
        if name in renamed and name not in valid:
            new = renamed[name]
            if new is None:
                return f"{prefix}.{name} was removed: {REMOVED_WHY.get(name, 'see the docs')}."
            return f"{prefix}.{name} is now {prefix}.{new} (one name per concept across methods)."
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; valid: {', '.join(sorted(valid))}."
            return f"{cls.__name__} has no argument {name!r} ({prefix}.{name}){hint}"
        for klass in cls.__mro__:
            new_value = RENAMED_VALUES.get((klass.__name__, name), {}).get(str(value))
            if new_value:
                return f"{prefix}.{name}: {value!r} is now {new_value!r}."
        annotation = valid[name].annotation
        group_cls = _dataclass(annotation)
        if group_cls is not None and len(rest) > 1:
            fields = [f.name for f in dataclasses.fields(group_cls)]
            renamed_field = RENAMED_FIELDS.get((group_cls.__name__, rest[1]))
            if renamed_field:
                return f"{prefix}.{name}.{rest[1]} is now {prefix}.{name}.{renamed_field} (one name per concept)."
            if rest[1] not in fields:
                close = difflib.get_close_matches(rest[1], fields, n=1, cutoff=0.5)
                hint = f"; did you mean {prefix}.{name}.{close[0]}?" if close else f"; valid: {', '.join(fields)}."
                return f"{group_cls.__name__} has no field {rest[1]!r} ({prefix}.{name}.{rest[1]}){hint}"
    return None


def _dataclass(annotation: Any) -> type | None:
    import petl_lightning

    if isinstance(annotation, str):
        annotation = getattr(petl_lightning, annotation.split("|")[0].strip(), None)
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _check_trainer(keys: dict[str, Any]) -> str | None:
    from lightning.pytorch import Trainer

    valid = list(init_arguments(Trainer))
    for key in keys:
        parts = key.split(".")
        if parts[0] == "trainer" and len(parts) > 1 and parts[1] not in valid:
            close = difflib.get_close_matches(parts[1], valid, n=1, cutoff=0.5)
            return f"Trainer has no argument {parts[1]!r} (trainer.{parts[1]})" + (
                f"; did you mean trainer.{close[0]}?" if close else "."
            )
    return None


def config_files(argv: list[str]) -> list[str]:
    """The ``-c`` / ``--config`` files of a command line, in order."""
    found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    found += [a.split("=", 1)[1] for a in argv if a.startswith(("-c=", "--config="))]
    return found


def yaml_problem(path: Path) -> str | None:
    """One line naming ``path`` and the line of its YAML syntax error, or None when it parses."""
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return f"Config file {str(path)!r} is not valid YAML:{where}: {problem}; fix the file."
    return None


def explain_parse_error(message: str, argv: list[str]) -> str:
    """One line for a jsonargparse error: the renamed or unknown key when the user's keys show one,
    else the innermost "key: problem" of the message."""
    configs = config_files(argv)
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        return f"Config file {missing[0]!r} not found: check the path (recipes live in the repository's recipes/)."
    for config in configs:
        bad_yaml = yaml_problem(Path(config))
        if bad_yaml:
            return bad_yaml
    keys = user_keys(argv)
    for value in _strings(list(keys.values())):
        name = value.rpartition(".")[2]
        if name in REMOVED_CLASSES:
            return f"{value} was removed: {REMOVED_CLASSES[name]}."
    for found in (_check_group(keys, "model"), _check_group(keys, "data"), _check_trainer(keys)):
        if found:
            return found
    keys_found = re.findall(r'(?:Parser key|Key) "([^"]+)"', message)
    if not keys_found:
        return " ".join(message.split())[:300]
    key = keys_found[-1]
    detail = message.split(f'"{key}"')[-1]
    if "NoneType" in detail and re.search(r"Given value: None\b", detail):
        group, _, field = key.rpartition(".")
        return (
            f"{key}: a nested null given on the command line reaches the parser as the string 'None'; set it in "
            f"a YAML config, or give the whole group, e.g. --model.init_args.{group}='{{{field}: null}}'."
        )
    lines = [ln.strip(" -") for ln in detail.splitlines()[1:] if ln.strip(" -:")]
    expected = [
        ln.removeprefix("Expected a ").strip("<>").replace("class ", "") for ln in lines if ln.startswith("Expected")
    ]
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    expected = list(dict.fromkeys(expected))
    if len(expected) > 1 and given is not None:
        return f"{key}: expected {' or '.join(expected)}, got {given!r}."
    return f"{key}: {(lines[0] if lines else 'invalid value').rstrip('.')}."


__all__ = ["RENAMED", "explain_parse_error", "import_class", "init_arguments", "user_keys"]
