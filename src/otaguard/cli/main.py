"""The ``otaguard`` command. One sub-command group per area; errors become one line + exit code.

Exit codes: 0 success, 1 a typed rejection (the line names its E_ code), 2 usage error,
130 interrupted. No stack trace ever reaches the user; set OTAGUARD_DEBUG=1 to see one.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from .. import __version__
from ..errors import ErrorCode, OtaError

# Sub-command groups, imported when used: a device running ``otaguard agent`` (a small CPU,
# or a VM without acceleration) should not pay for the server's and simulator's imports.
COMMANDS: dict[str, str] = {
    "keys": "keys_admin:keys",  # keys.py + `keys publish`
    "fleet": "fleet_admin:fleet",  # fleet.py + the admin-API fleet views
    "server": "server:server",
    "audit": "audit:audit",
    "release": "release_admin:release",  # release.py + publish/list/show
    "signing": "signing:signing",
    "manifest": "manifest:manifest",
    "device": "device_sync:device",  # device.py + `device sync` (talks to a server)
    "agent": "agent:agent",
    "campaign": "campaign:campaign",
    "rotation": "rotation:rotation",
    "tuf": "tuf:tuf",
    "simulate": "simulate:simulate",
    "demo": "simulate:demo",
    "simulate-renewal": "simulate:simulate_renewal",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        assert isinstance(command, click.Command)
        self.add_command(command, cmd_name)
        return command


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="otaguard")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def cli(verbose: bool) -> None:
    """otaguard: sign, ship and install firmware updates that devices can trust."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="otaguard", standalone_mode=False)
    except OtaError as err:
        click.echo(f"otaguard: error {err.code.value}: {err.detail}", err=True)
        return 2 if err.code == ErrorCode.USAGE else 1
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as before
            exc.show()
            return exc.exit_code
        # One line like every other error (scripts grep the code); `--help` shows the usage.
        where = f" ({exc.ctx.command_path})" if exc.ctx is not None else ""
        msg = " ".join(exc.format_message().split())
        click.echo(f"otaguard: error {ErrorCode.USAGE.value}: {msg}{where}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("otaguard: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("otaguard: interrupted", err=True)
        return 130
    except Exception as exc:  # last line of defence: a bug, never a trace for the user
        if os.environ.get("OTAGUARD_DEBUG"):
            raise
        click.echo(
            f"otaguard: error {ErrorCode.INTERNAL.value}: {type(exc).__name__}: {exc}", err=True
        )
        return 1
    # In non-standalone mode click returns ctx.exit() codes (and command return values).
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
