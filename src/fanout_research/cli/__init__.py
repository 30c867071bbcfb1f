"""The ``fanout`` command.

``main`` is the console script: it turns every user error into one line on stderr and exit code 2,
so that an agent driving the CLI gets an answer it can act on, never a traceback or a usage box.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.24 vendors click; older releases depend on it
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

from fanout_research.errors import FanoutError

EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_WAIT_TIMEOUT = 124

app = typer.Typer(
    name="fanout",
    help="Run autoresearch experiments as parallel batch jobs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def fail(message: str) -> None:
    """Print one error line and leave with the bad-input status."""
    raise FanoutError(message)


def main(argv: list[str] | None = None) -> int:
    from fanout_research.cli import jobs_cmds, research_cmds  # noqa: F401 - registers the commands

    try:
        result = app(args=argv, prog_name="fanout", standalone_mode=False)
    except FanoutError as exc:
        print(f"fanout: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `fanout`: just the help
            print(exc.format_message().removeprefix("Usage: ").join(["Usage: ", ""]))
            return 0
        print(f"fanout: error: {exc.format_message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("fanout: interrupted", file=sys.stderr)
        return 130
    except ClickException as exc:
        print(f"fanout: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
