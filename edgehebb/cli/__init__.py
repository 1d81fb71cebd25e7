"""The ``edgehebb`` command line: thin Click commands over the library, one module per command.

User mistakes raise ``EdgehebbError`` anywhere in the library; ``main`` prints them as one
``Error: ...`` line and exits 1 (``--debug`` keeps the traceback). Results go to stdout (``--json``),
progress and logs to stderr. Only click and the standard library load with this package, so
``edgehebb --help`` imports neither torch nor any optional dependency.
"""

from __future__ import annotations

import sys

import click

from edgehebb import __version__
from edgehebb.cli.bench import bench
from edgehebb.cli.eval import eval_
from edgehebb.cli.export import export
from edgehebb.cli.learn import learn, show
from edgehebb.cli.serve import serve
from edgehebb.cli.train import train
from edgehebb.errors import EdgehebbError


class _Group(click.Group):
    """Lists each command with its whole first sentence, wrapped between words (click cuts it to fit
    one line, and its wrapping splits "rank-update" at the hyphen)."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        import textwrap

        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if not rows:
            return
        with formatter.section("Commands"):
            indent = " " * formatter.current_indent
            first = max(len(name) for name, _ in rows) + 2
            width = max(formatter.width - formatter.current_indent - first, 20)
            for name, text in rows:
                lines = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
                formatter.write(f"{indent}{name:<{first}}{lines[0]}\n")
                formatter.write("".join(f"{indent}{'':<{first}}{line}\n" for line in lines[1:]))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="edgehebb")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Learn convolutional filters with a local Hebbian rule and ship them to edge GPUs."""
    ctx.obj = {"debug": debug}



for _command in (learn, show, train, eval_, export, bench, serve):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per user error, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="edgehebb", standalone_mode=False)
    except click.exceptions.Abort as e:
        # a learning run stopped by SIGINT/SIGTERM has said where its checkpoint is; exit as the signal would
        signum = getattr(e.__cause__, "signum", None)
        if signum is None:   # Ctrl-C anywhere else
            click.echo("Aborted.", err=True)
            signum = 2
        sys.exit(128 + signum)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgehebbError as e:
        if "--debug" in args:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
