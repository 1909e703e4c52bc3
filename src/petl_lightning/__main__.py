"""The console scripts: ``petl-lightning`` (also ``python -m petl_lightning``) and ``lightning``.

``fit|validate|test|predict`` run the Lightning CLI (:class:`~petl_lightning.cli.PETLCLI`); ``vtab``
runs a recipe on many VTAB-1K tasks; ``vtab-prepare`` / ``vtab-check`` build / verify VTAB-1K task
folders; ``export`` turns a checkpoint into a deployable file; ``serve`` serves many tasks' checkpoints
over one backbone. Every user mistake prints one line and
exits with status 2.
"""

from __future__ import annotations

import sys

from petl_lightning.cli import PETLCLI, SUBCOMMANDS, OutputGuard
from petl_lightning.errors import find_user_error, run_user_command


def _run_cli(argv: list[str] | None) -> None:
    """The Lightning CLI; after a user error (e.g. a corrupt image met mid-epoch) what the run created
    under its output folder is removed, unless it wrote a checkpoint."""
    guard = OutputGuard()
    try:
        PETLCLI(args=argv, output_guard=guard)
    except Exception as err:
        if find_user_error(err) is not None:
            guard.discard()
        raise


def main(argv: list[str] | None = None) -> None:
    """``petl-lightning`` / ``python -m petl_lightning``: Lightning's ``fit|validate|test|predict``,
    ``vtab`` (a recipe on many VTAB-1K tasks), ``vtab-prepare`` (build VTAB-1K from TensorFlow
    Datasets), ``vtab-check`` (verify a VTAB-1K folder) and ``export`` (a checkpoint to a deployable file)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "vtab":
        from petl_lightning.vtab import vtab_main

        sys.exit(vtab_main(args[1:]))
    if args and args[0] == "export":
        from petl_lightning.export import export_main

        sys.exit(export_main(args[1:]))
    if args and args[0] == "serve":
        from petl_lightning.serve.command import serve_main

        sys.exit(serve_main(args[1:]))
    if args and args[0] == "vtab-check":
        from petl_lightning.data.check import check_main

        sys.exit(check_main(args[1:]))
    if args and args[0] == "vtab-prepare":
        from petl_lightning.data.prepare import prepare_main

        sys.exit(prepare_main(args[1:]))
    sys.exit(run_user_command(lambda: _run_cli(argv)))


def lightning_main(argv: list[str] | None = None) -> None:
    """The ``lightning`` script: our CLI for ``fit|validate|test|predict``; any other sub-command goes
    to ``lightning_sdk``'s CLI (the cloud tool that also installs a ``lightning`` script) if present."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in SUBCOMMANDS or args[0].startswith("-"):
        sys.exit(run_user_command(lambda: _run_cli(argv)))
    try:
        from lightning_sdk.cli.entrypoint import main_cli
    except ImportError:
        print(
            f"error: 'lightning {args[0]}' is not a petl_lightning command (use fit, validate, test or predict), "
            f"and lightning-sdk, whose CLI has other commands, is not installed.",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.argv = ["lightning", *args]
    main_cli()


if __name__ == "__main__":
    main()
