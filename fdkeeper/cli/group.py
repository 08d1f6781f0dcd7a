"""The `fdkeeper` command group: every error one line on stderr and exit status 2, whatever
raised it (a bad option, an impossible mode, an FdkeeperError), so a new command only has to
raise FdkeeperError."""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click

from fdkeeper import __version__
from fdkeeper.errors import FdkeeperError

PASS_THROUGH: dict[str, Any] = {
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
    "help_option_names": ["--help"],
}


# Commands whose modules are heavy, imported only when named (or listed by --help): the test
# runner brings the testbed and cryptography (about 80 ms), the runs bring sipp's argument
# parser, the modes, TLS and psutil (about 30 ms), which `fdkeeper status --count` in a
# script's loop would otherwise pay on every start (test_cli_imports.py).
LAZY_COMMANDS = {
    "run": ("fdkeeper.testrun.command", "run_command"),
    "sipp": ("fdkeeper.cli.runs", "sipp_command"),
    "exec": ("fdkeeper.cli.runs", "exec_command"),
}


class Commands(click.Group):
    """The command group, with every error as one line and exit status 2, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            module, attribute = LAZY_COMMANDS[name]
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, name)
        return command

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False  # click raises; we say it in one line
        try:
            code = super().main(*args, **kwargs)
        except FdkeeperError as error:
            click.echo(str(error), err=True)
            sys.exit(error.exit_status)
        except click.ClickException as error:
            if "\n" in error.format_message().strip():  # the help itself, for a bare `fdkeeper` (click 8.2+)
                error.show()
                sys.exit(error.exit_code)
            context = error.ctx if isinstance(error, click.UsageError) else None
            where = f" (see '{context.command_path} --help')" if context else ""
            click.echo(f"fdkeeper: {' '.join(error.format_message().split())}{where}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("fdkeeper: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fdkeeper")
def main() -> None:
    """Keep sipp's TCP, TLS and WebSocket connections to the System under Test open across sipp runs.

    \b
    Register in one run, answer calls in the next, over the same connection (from the
    repository root, against 'fdkeeper sut --port 5060' or your SuT's address):
      fdkeeper sipp -sf scenarios/uac-register.xml -inf scenarios/users.csv -t t1 -i 127.0.0.1 -m 1 127.0.0.1:5060
      fdkeeper sipp -sf scenarios/uas-answer.xml -t t1 -i 127.0.0.1 -p 5070 -m 5 127.0.0.1:5060
      fdkeeper status
      fdkeeper stop

    A keeper process starts on first use and holds the connections; each sipp run is
    handed them by a handoff mode (--mode: preload, ptrace or udp; auto picks one that
    can do the run). Any other SIP agent: 'fdkeeper exec'. Try 'fdkeeper demo' for a
    complete run against a local Kamailio.
    """
