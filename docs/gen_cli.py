"""Write docs/cli.md from the CLI's own parser (run by `make docs` before the site is built)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mavis_align.cli import build_parser


def render(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# CLI reference", "", "Generated from `mavis_align.cli.build_parser` by `docs/gen_cli.py`; `mavis-align COMMAND --help` prints the same.", ""]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        out += [f"## `mavis-align {name}`", "", helps.get(name) or "", "", "| option | default | help |", "|---|---|---|"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest}`"
            default = "" if a.default in (None, argparse.SUPPRESS, False) or a.required else f"`{a.default}`"
            # brackets escaped: "[#INDEX][@FORMAT]" would read as a Markdown reference link
            text = (a.help or "").replace("|", "\\|").replace("\n", " ").replace("[", "\\[").replace("]", "\\]")
            if a.choices:
                text += (" " if text else "") + "(" + ", ".join(map(str, a.choices)) + ")"
            out.append(f"| {flags} | {default} | {text} |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("cli.md").write_text(render(build_parser()))
