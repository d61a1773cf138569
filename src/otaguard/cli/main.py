"""The ``otaguard`` command. One sub-command group per area; errors become one line + exit code.

Exit codes: 0 success, 1 a typed rejection (the line names its E_ code), 2 usage error,
130 interrupted. No stack trace ever reaches the user; set OTAGUARD_DEBUG=1 to see one.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from .. import __version__
from ..errors import ErrorCode, OtaError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="otaguard")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def cli(verbose: bool) -> None:
    """otaguard: sign, ship and install firmware updates that devices can trust."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# Sub-command groups register here (one import + add_command each).
from .keys import keys  # noqa: E402

cli.add_command(keys)
from .fleet import fleet  # noqa: E402
from .manifest import manifest  # noqa: E402
from .server import server  # noqa: E402

cli.add_command(fleet)
cli.add_command(server)
from .audit import audit  # noqa: E402
from .release import release  # noqa: E402
from .signing import signing  # noqa: E402

cli.add_command(audit)
cli.add_command(release)
cli.add_command(signing)
cli.add_command(manifest)
from .agent import agent  # noqa: E402
from .device import device  # noqa: E402

cli.add_command(device)
cli.add_command(agent)
from .campaign import campaign  # noqa: E402

cli.add_command(campaign)
from .rotation import rotation  # noqa: E402

cli.add_command(rotation)
from .simulate import demo, simulate  # noqa: E402

cli.add_command(simulate)
cli.add_command(demo)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="otaguard", standalone_mode=False)
    except OtaError as err:
        click.echo(f"otaguard: error {err.code.value}: {err.detail}", err=True)
        return 2 if err.code == ErrorCode.USAGE else 1
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
