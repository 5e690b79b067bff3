"""Every command module of `factory/cli` is registered by name: none can go missing from `factory --help`."""

from __future__ import annotations

import ast
from pathlib import Path

import factory.cli.main as cli_main


def _defines_commands(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets)
        for node in tree.body
    )


def test_every_command_module_is_listed() -> None:
    folder = Path(cli_main.__file__).parent
    defining = {f"factory.cli.{p.stem}" for p in folder.glob("*.py") if _defines_commands(p)}
    assert defining == {m.__name__ for m in cli_main.COMMAND_MODULES}


def test_every_listed_command_is_registered() -> None:
    for module in cli_main.COMMAND_MODULES:
        for command in module.COMMANDS:
            assert cli_main.main.commands[command.name] is command
