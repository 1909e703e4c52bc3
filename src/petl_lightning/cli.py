"""The Lightning command line behind ``petl-lightning fit|validate|test|predict -c recipes/<method>.yaml``
(the console scripts live in :mod:`petl_lightning.__main__`).

`PETLCLI` is a ``LightningCLI`` in subclass mode for the model and the data, with ``data.num_classes``
linked into the model, two forced callbacks, :class:`~petl_lightning.callbacks.PETLCheckpoint`
(``last.ckpt`` every epoch in ``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` works in a
new process) and :class:`~petl_lightning.callbacks.PredictionWriter` (``predict`` writes a CSV), and
checkpoints written atomically (:class:`~petl_lightning.callbacks.AtomicCheckpointIO`).
A checkpoint given to ``--ckpt_path`` must come from the same method and backbone; its structural
hyper-parameters (``STRUCTURAL_HPARAMS`` of the method) win over the command line, every other value
given now wins (an unset ``null`` falls back to the stored one). User mistakes are one line and exit 2,
and the files a failed run created are removed (:class:`OutputGuard`) unless it wrote a checkpoint.
It uses LightningCLI's documented hooks only (``parse_arguments``, ``before_instantiate_classes``,
``instantiate_trainer``, ``before_<subcommand>``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from petl_lightning.cli_keys import explain_parse_error, import_class
from petl_lightning.errors import CheckpointError, ConfigError
from petl_lightning.paths import check_writable
from petl_lightning.tasks.checkpoints import read_checkpoint

SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVALUATIONS = ("validate", "test", "predict")
#: ``--ckpt_path untrained``: evaluate the model as built (no checkpoint), on purpose.
UNTRAINED = "untrained"


class LoggerSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` and, with a W&B logger, sends the effective configuration to the run."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.config.as_dict()
                config.setdefault("model", {}).setdefault("init_args", {}).update(dict(pl_module.hparams))
                logger.experiment.config.update(config, allow_val_change=True)


class OutputGuard:
    """What a run's output folder held before the run, so that the files a failed run created can be
    removed (the console scripts hand one to :class:`PETLCLI` and call :meth:`discard` on a user error)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.before: set[Path] = set()

    def snapshot(self, root: Path) -> None:
        self.root = root
        self.before = set(root.rglob("*")) if root.is_dir() else set()

    def discard(self) -> None:
        """Delete what the run created under its folder, unless it wrote a checkpoint (it can resume)."""
        if self.root is not None:
            discard_new_outputs(self.root, self.before)


class PETLCLI(LightningCLI):
    """LightningCLI for petl_lightning modules and data modules (see the module docstring).

    Args:
        output_guard: records the output folder before the subcommand runs (see :class:`OutputGuard`).
        *args, **kwargs: ``LightningCLI``'s.
    """

    def __init__(self, *args: Any, output_guard: OutputGuard | None = None, **kwargs: Any) -> None:
        import petl_lightning

        petl_lightning.import_all()  # registers every class for short class_path names
        import lightning as L
        from jsonargparse import set_parsing_settings

        from petl_lightning.methods.config import MethodConfig

        # a segmenter's ``method:`` takes any method's config by class_path (a dataclass subclass)
        set_parsing_settings(subclasses_enabled=[MethodConfig])

        # Lightning logs "Seed set to N" before the classes are built; a run refused while building
        # them must print its one error line only, so the seed is printed when the run starts instead.
        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
        self.output_guard = output_guard or OutputGuard()
        self.ckpt_hparams: dict[str, Any] | None = None  # the --ckpt_path checkpoint's hyper-parameters
        self.given_model: Namespace | None = None  # the model config given, before Lightning reads the checkpoint
        kwargs.setdefault("model_class", L.LightningModule)  # classification (PETLModule) or Segmenter
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggerSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs", {"exit_on_error": False, **{s: {"exit_on_error": False} for s in SUBCOMMANDS}}
        )
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        from petl_lightning.callbacks import PETLCheckpoint, PredictionWriter

        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(PETLCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # normalization="backbone" takes the mean/std of the model's backbone (its timm pretrained cfg)
        parser.link_arguments("model.init_args.model_name", "data.init_args.backbone_name")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse; then resolve ``--ckpt_path last`` and refuse a checkpoint of another method or
        backbone, before Lightning reads the checkpoint's hyper-parameters into the config."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(explain_parse_error(str(err), sys.argv[1:] if args is None else list(args))) from None
        self.read_ckpt_path()

    def subcommand_config(self) -> Namespace:
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    # -- checkpoints given to --ckpt_path ------------------------------------------------------------
    def read_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``; refuse a checkpoint of another method or backbone; keep its
        hyper-parameters and the model config given, for :meth:`before_instantiate_classes`."""
        sub, cfg = self.config.get("subcommand"), self.subcommand_config()
        path = cfg.get("ckpt_path")
        if sub in EVALUATIONS and path is None:
            raise CheckpointError(
                f"{sub} without --ckpt_path would evaluate an untrained model: pass --ckpt_path last (the "
                f"last fit under --trainer.default_root_dir) or a .ckpt file; --ckpt_path {UNTRAINED} "
                f"evaluates the model as built, on purpose."
            )
        if path == UNTRAINED and sub in EVALUATIONS:
            cfg["ckpt_path"] = None
            return
        if not sub or path in (None, "best", "hpc", "registry"):
            return
        if path == "last":
            path = self.last_checkpoint(cfg)
            if path is None:
                if sub == "fit":  # nothing to resume yet: say so (Lightning's own hint does not apply)
                    rank_zero_print(
                        f"--ckpt_path last: no checkpoint in {self.checkpoint_dir(cfg)} yet; training starts fresh.",
                    )
                    cfg["ckpt_path"] = None
                    return
                raise CheckpointError(
                    f"--ckpt_path last: no last.ckpt in {self.checkpoint_dir(cfg)}. Fit first (same "
                    f"--trainer.default_root_dir), or pass the .ckpt file."
                )
            cfg["ckpt_path"] = str(path)
        ckpt = read_checkpoint(path)
        cls = import_class(cfg["model.class_path"])
        stored_cls = import_class(ckpt.get("petl", {}).get("method", ""))
        if stored_cls is not None and cls is not None and stored_cls is not cls:
            raise CheckpointError(
                f"{path} was written by {stored_cls.__name__}, but this run builds {cls.__name__}: "
                f"use the {stored_cls.__name__} recipe (or the run's config.yaml) with this checkpoint."
            )
        stored = ckpt.get("hyper_parameters", {})
        args = cfg["model.init_args"]
        if "model_name" in stored and stored["model_name"] != args.get("model_name"):
            raise CheckpointError(
                f"{path} was trained on backbone {stored['model_name']!r}, but this run builds "
                f"{args.get('model_name')!r}: pass --model.init_args.model_name {stored['model_name']}."
            )
        self.ckpt_hparams, self.given_model = stored, cfg["model"].clone()

    def model_config_with_checkpoint(self) -> Namespace:
        """The model config given, with the checkpoint's structural hyper-parameters (``group.field``:
        one field of an option group) and its values for the arguments left unset (``null``)."""
        assert self.given_model is not None and self.ckpt_hparams is not None
        model = self.given_model.clone()
        structural = set(getattr(import_class(model["class_path"]), "STRUCTURAL_HPARAMS", ()))
        args = model["init_args"]
        for key, value in self.ckpt_hparams.items():
            if key not in args or key.startswith("_") or key == "num_classes":
                continue
            if isinstance(value, dict) and isinstance(args[key], Namespace):  # an option group, field by field
                for field, stored in value.items():
                    if key in structural or f"{key}.{field}" in structural:
                        args[key][field] = stored
            elif key in structural or args[key] is None:
                args[key] = value
        return model

    def checkpoint_dir(self, cfg: Namespace) -> Path:
        return Path(cfg.get("checkpoint.dirpath") or Path(cfg["trainer.default_root_dir"] or ".") / "checkpoints")

    def last_checkpoint(self, cfg: Namespace) -> Path | None:
        path = self.checkpoint_dir(cfg) / "last.ckpt"
        return path if path.is_file() else None

    # -- classes ---------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Take the ``--ckpt_path`` checkpoint's architecture (replacing Lightning's reading of its
        hyper-parameters, which would override every value given now); reconcile image sizes; apply
        the method's per-task hyper-parameters to unset arguments; check values Lightning would
        accept or fail on with a traceback."""
        cfg = self.subcommand_config()
        if self.given_model is not None:
            cfg["model"] = self.model_config_with_checkpoint()
        model_size, data_size = cfg.get("model.init_args.img_size"), cfg.get("data.init_args.img_size")
        if "model.init_args.img_size" in cfg and "data.init_args.img_size" in cfg:
            if model_size is None and data_size is not None:
                cfg["model.init_args.img_size"] = data_size
            elif model_size is not None and data_size is not None and model_size != data_size:
                raise ConfigError(
                    f"--model.init_args.img_size={model_size} but --data.init_args.img_size={data_size}: "
                    f"the backbone must be built for the size of its images. Set both to the same value, "
                    f"or set only --data.init_args.img_size (the model follows it)."
                )
        cls = import_class(cfg.get("model.class_path") or "")
        task = cfg.get("data.init_args.task")
        if cls is not None and task and hasattr(cls, "task_overrides"):
            args = cfg["model.init_args"]
            for key, value in cls.task_overrides(task, dict(args)).items():
                if args.get(key) is None:
                    args[key] = value
        epochs = cfg.get("trainer.max_epochs")
        if epochs is not None and (epochs < -1 or epochs == 0):
            raise ConfigError(
                f"--trainer.max_epochs must be a positive number of epochs (or -1 for no limit), got {epochs}."
            )
        if self.config.get("subcommand") == "fit" and epochs == -1 and cfg.get("trainer.max_steps", -1) in (None, -1):
            raise ConfigError(
                "--trainer.max_epochs -1 with no --trainer.max_steps: the learning-rate schedule needs the "
                "run's length; set --trainer.max_steps N or a finite --trainer.max_epochs."
            )
        check_writable(Path(cfg.get("trainer.default_root_dir") or "."))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with checkpoints written atomically unless the recipe sets its own checkpoint IO."""
        from lightning.pytorch.plugins.io import CheckpointIO

        from petl_lightning.callbacks import AtomicCheckpointIO

        given = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {}).get("plugins")
        plugins = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        try:
            return super().instantiate_trainer(plugins=plugins, **kwargs)
        except MisconfigurationException as err:
            raise ConfigError(f"{' '.join(str(err).split())} (fix the --trainer.* arguments).") from None

    def check_ckpt_path(self) -> None:
        """Fail before the trainer starts (no logs, no files) when ``--ckpt_path`` does not fit."""
        path = self.subcommand_config().get("ckpt_path")
        if path in (None, "last", "best", "hpc", "registry"):
            return
        self.model.check_checkpoint(read_checkpoint(path))

    def before_run(self) -> None:
        self.output_guard.snapshot(Path(self.trainer.default_root_dir))
        self.check_ckpt_path()
        seed = self.subcommand_config().get("seed_everything")
        if seed is not None and seed is not False:
            rank_zero_print(f"Seed set to {seed}")  # said once the run starts (see __init__)

    def before_fit(self) -> None:
        self.before_run()

    def before_validate(self) -> None:
        self.before_run()

    def before_test(self) -> None:
        self.before_run()

    def before_predict(self) -> None:
        self.before_run()


def rank_zero_print(message: str, file: Any = None) -> None:
    """Print ``message`` (to stderr by default) in the first process only."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=file or sys.stderr)


def discard_new_outputs(root: Path, before: set[Path]) -> None:
    """Delete the files and folders under ``root`` that are not in ``before``, unless one of them is
    a checkpoint (a run that saved one can resume; its logs belong to it)."""
    new = [p for p in root.rglob("*") if p not in before] if root.is_dir() else []
    if any(p.suffix == ".ckpt" for p in new):
        return
    for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
        elif p.is_file() or p.is_symlink():
            p.unlink()
    if root.is_dir() and root not in before and not any(root.iterdir()):
        root.rmdir()


__all__ = ["PETLCLI", "SUBCOMMANDS", "OutputGuard"]
