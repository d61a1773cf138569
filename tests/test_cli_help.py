"""Every command answers ``--help`` with exit 0, with no server, token or key around (the
rotation commands used to exit 2: their group required --server before --help was seen)."""

from __future__ import annotations

import click
import pytest

from otaguard.cli.main import COMMANDS, cli, main


def _paths() -> list[list[str]]:
    ctx = click.Context(cli)
    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append(path)
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                walk(sub, [*path, name])

    walk(cli, [])
    return out


PATHS = _paths()


def test_every_group_is_listed() -> None:
    assert {p[0] for p in PATHS if p} == set(COMMANDS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "otaguard")
def test_help_needs_nothing(
    path: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OTAGUARD_SERVER", "OTAGUARD_ADMIN_TOKEN", "OTAGUARD_SIGNING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert main([*path, "--help"]) == 0, capsys.readouterr().err
    assert "Usage:" in capsys.readouterr().out
