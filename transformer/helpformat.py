"""The help formatter of every command in the project: each option's default shown once, and none where there is
nothing to show.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: ...)`` to every option: ``(default: None)`` for an
option without a value, ``(default: False)`` for a switch, and a second default after help that states its own
("(default: all 1) (default: None)"). This one leaves those out. It lives in ``transformer/``, the layer every
other package may import (scripts -> model -> transformer), so the transformer's own command uses it too.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, [], (), "", argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, with the description and epilog kept as written (examples, tables)."""
