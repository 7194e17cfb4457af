"""The `unpatch` command line: this module assembles the command groups (recipes, patches,
evaluation, importing, share: one module each, their shared options in options.py) into one app,
in the order `--help` lists them, and maps errors to one line. Every command parses, makes one
library call, and prints.

Errors a user can fix arrive as UnpatchError and print as one line (exit code 2); set
UNPATCH_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated

import click
import typer

from .. import progress
from ..errors import UnpatchError
from . import evaluation, examples, importing, patches, recipes, share

app = typer.Typer(help="Build, apply, stack and revert unlearning patches for causal language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        from ..version import __version__

        print(f"unpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Build, apply, stack and revert unlearning patches for causal language models."""


for _group in (recipes, patches, evaluation, importing, share):  # the order `unpatch --help` lists them in
    app.registered_commands.extend(_group.app.registered_commands)
examples.attach(app)  # examples in every --help: after every command is registered


def _click_types(name: str) -> tuple[type, ...]:
    import typer._click.exceptions as bundled
    import typer.exceptions as typer_exc

    return tuple({getattr(m, name) for m in (bundled, typer_exc, click.exceptions) if hasattr(m, name)})


_USAGE = _click_types("ClickException")
_EXIT = _click_types("Exit")
_ABORT = _click_types("Abort")


def _usage_line(e: Exception) -> str:
    """click's message on one line, with the command to ask for help (click prints usage + 2 lines)."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    return f"{msg} (see `{ctx.command_path} --help`)" if ctx is not None else msg


def main() -> None:
    debug = os.environ.get("UNPATCH_DEBUG") == "1"
    progress.quiet_third_party()  # before transformers / huggingface_hub are imported: their bars stay off
    # peft probes a property transformers 5 deprecates; the warning says nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        code = app(prog_name="unpatch", standalone_mode=False)
    except UnpatchError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except _USAGE as e:  # typer >= 0.26 raises its own bundled click's exceptions, older ones click's
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `unpatch`: typer has printed the help already
            if e.format_message().strip():
                print(e.format_message(), file=sys.stderr)
            sys.exit(2)
        print(f"error: {_usage_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code or 2)
    except _EXIT as e:  # --version, --help under standalone_mode=False
        sys.exit(getattr(e, "exit_code", 0))
    except (*_ABORT, KeyboardInterrupt):
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set UNPATCH_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
