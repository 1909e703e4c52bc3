"""Command line: ``petl-lightning fit -c recipes/<method>.yaml`` (also ``python -m petl_lightning``
and the ``lightning`` script for ``fit|validate|test|predict``).

`PETLCLI` is a ``LightningCLI`` in subclass mode for both the model and the data, with
``data.num_classes`` linked into the model. User mistakes (:class:`~petl_lightning.errors.PETLError`)
are printed as one clear line, without a stack trace, and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from petl_lightning.errors import CheckpointError, PETLError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LoggerSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` and, with a W&B logger, sends the effective configuration to the run."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.config.as_dict()
                config.setdefault("model", {}).setdefault("init_args", {}).update(dict(pl_module.hparams))
                logger.experiment.config.update(config, allow_val_change=True)


class PETLCLI(LightningCLI):
    """LightningCLI for petl_lightning modules and data modules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from petl_lightning.data.vtab import VTAB1kDataModule
        from petl_lightning.methods.base import PETLModule

        import petl_lightning  # noqa: F401 - registers every class for short class_path names

        kwargs.setdefault("model_class", PETLModule)
        kwargs.setdefault("datamodule_class", VTAB1kDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggerSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # normalization="backbone" takes the mean/std of the model's backbone (its timm pretrained cfg)
        parser.link_arguments("model.init_args.model_name", "data.init_args.backbone_name")

    def before_instantiate_classes(self) -> None:
        """Build the backbone for the image size the data produces.

        ``model.img_size`` left unset (``None``) takes ``data.img_size``; two different explicit
        sizes are a user error. Without this a recipe that sets only the data size crashes at fit
        start in Lightning's hyper-parameter merge (the two ``img_size`` values differ).
        """
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        model_key, data_key = "model.init_args.img_size", "data.init_args.img_size"
        if model_key not in cfg or data_key not in cfg:
            return  # a model or data class without an img_size argument: nothing to reconcile
        model_size, data_size = cfg[model_key], cfg[data_key]
        if model_size is None and data_size is not None:
            cfg[model_key] = data_size
        elif model_size is not None and data_size is not None and model_size != data_size:
            raise PETLError(
                f"--model.init_args.img_size={model_size} but --data.init_args.img_size={data_size}: the "
                f"backbone must be built for the size of the images it gets. Set both to the same value, "
                f"or set only --data.init_args.img_size (the model follows it)."
            )

    def _check_ckpt_path(self) -> None:
        """Fail before the trainer starts (no logs, no files) when ``--ckpt_path`` is unusable."""
        path = self.config[self.subcommand].get("ckpt_path")
        if path in (None, "last", "best", "hpc", "registry"):
            return
        check_lightning_checkpoint(path, self.model)

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def before_predict(self) -> None:
        self._check_ckpt_path()


def check_lightning_checkpoint(path: str | Path, model: Any | None = None) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` on CPU and check it fits ``model``; raise a clear error otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"Checkpoint not found: {str(p)!r}. Pass the .ckpt written by a fit run.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any reader failure means: not a checkpoint
        raise CheckpointError(
            f"{str(p)!r} is not a Lightning checkpoint ({type(err).__name__}). --ckpt_path takes a .ckpt "
            f"written by a fit run; backbone weights (.npz/.pth/.safetensors) go to --model.checkpoint_path."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{str(p)!r} holds no 'state_dict', so it is not a Lightning checkpoint. Backbone weights go "
            f"to --model.checkpoint_path."
        )
    if model is not None and hasattr(model, "check_checkpoint"):
        model.check_checkpoint(ckpt)
    return ckpt


def find_user_error(err: BaseException) -> PETLError | None:
    """The :class:`PETLError` behind ``err``, if any (jsonargparse wraps errors raised in ``__init__``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PETLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _run(argv: list[str] | None) -> int:
    try:
        PETLCLI(args=argv)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    """``petl-lightning`` / ``python -m petl_lightning``: Lightning's ``fit|validate|test|predict``,
    plus ``vtab`` (run a recipe on many VTAB-1K tasks and write the results table)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "vtab":
        from petl_lightning.runner import vtab_main

        sys.exit(vtab_main(args[1:]))
    sys.exit(_run(argv))


def lightning_main(argv: list[str] | None = None) -> None:
    """The ``lightning`` script: our CLI for ``fit|validate|test|predict``; any other sub-command goes
    to ``lightning_sdk``'s CLI (the cloud tool that also installs a ``lightning`` script) if present."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in LIGHTNING_SUBCOMMANDS or args[0].startswith("-"):
        sys.exit(_run(argv))
    try:
        from lightning_sdk.cli.entrypoint import main_cli  # type: ignore[import-not-found]
    except ImportError:
        print(
            f"error: 'lightning {args[0]}' is not a petl_lightning command (use fit, validate, test or "
            f"predict), and lightning-sdk, whose CLI has other commands, is not installed.",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.argv = ["lightning", *args]
    main_cli()


__all__ = ["PETLCLI", "check_lightning_checkpoint", "lightning_main", "main"]
