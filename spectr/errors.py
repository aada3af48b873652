"""How the `spectr` command answers a mistake: one line naming what is wrong and what to do, a non-zero
exit, no traceback (unless --debug). The root command group below does it for every verb."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, Sequence

import click
import typer
from typer.core import TyperGroup

# Set by the root callback (--debug, --verbose); read when an error is reported.
OPTIONS = {"debug": False, "verbose": False}

# Errors whose message is the whole story: the user's input was wrong. Anything else is reported in one
# line too, marked as an internal error with the hint to rerun with --debug.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def report(message: str) -> None:
    """Print `error: message` as one line on stderr (never wrapped)."""
    click.echo(f"error: {message}", err=True)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per command)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(verbose: bool, debug: bool) -> None:
    """Library code logs through `logging`; the CLI shows WARNING and above, INFO with --verbose."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    # The level sits on the handler too: records of loggers that set their own level (Prefect's run loggers
    # log INFO for the server) still reach the root's handlers by propagation.
    handler = _Stderr()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for chatty in ("httpx", "httpcore"):  # one line per HTTP request to the Prefect server
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    # Prefect (only imported when a server is configured): its console output only with --verbose; its API
    # handler still sends every run log to the server.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO" if verbose or debug else "CRITICAL"
    os.environ["PREFECT_LOGGING_ROOT_LEVEL"] = logging.getLevelName(level)
    warnings.showwarning = _show_warning


_python_show_warning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """spectr's own warnings (the runtime's, e.g. a bundle built for another base) as one log line, like every
    other message of the CLI; other libraries' warnings as Python shows them."""
    if category.__module__.startswith("spectr.") and not OPTIONS["debug"]:
        logging.getLogger("spectr").warning(str(message).splitlines()[0] if str(message) else category.__name__)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def _is_usage_error(exc: BaseException) -> bool:
    # click's and typer's (vendored) ClickException alike: a bad command line, with its own message and code.
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


class Group(TyperGroup):
    """The root group: turns every exception of every verb into one line (a traceback with --debug)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        OPTIONS.update(debug=False, verbose=False)
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except (typer.Exit, click.exceptions.Exit) as exc:
            code = exc.exit_code
        except (typer.Abort, click.exceptions.Abort) as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
                report("interrupted (Ctrl-C)")
                code = 130
            else:
                report("aborted")
                code = 1
        except Exception as exc:
            code = self._report(exc, argv)
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _report(exc: Exception, argv: list[str]) -> int:
        if _is_usage_error(exc):
            if type(exc).__name__ == "NoArgsIsHelpError":  # `spectr` alone: the help, as usual
                exc.show()
            else:  # a missing option, a bad value, an unknown verb
                where = exc.ctx.command_path if getattr(exc, "ctx", None) else "spectr"
                report(f"{exc.format_message()} (see `{where} --help`)")
            return exc.exit_code
        if OPTIONS["debug"] or "--debug" in argv:
            raise exc
        if isinstance(exc, USER_ERRORS):
            report(one_line(exc))
        elif type(exc).__name__ == "OperationalError" and getattr(exc, "orig", None) is not None:
            # SQLAlchemy's wrapper of the driver's error: read-only file, locked, unreachable server.
            report(f"the registry database refused: {one_line(exc.orig)} (check SPECTR_REGISTRY_URL or "
                   f"SPECTR_HOME and their permissions)")
        else:
            report(f"{type(exc).__name__}: {one_line(exc)} (an internal error: rerun with --debug for the traceback)")
        return 1


def fail(problem: BaseException | str, code: int = 1) -> None:
    """Report a mistake in one line and exit with `code`; with --debug an exception is re-raised instead
    (call it inside the `except` block, so the traceback is the original one)."""
    if isinstance(problem, BaseException):
        if OPTIONS["debug"]:
            raise problem
        problem = one_line(problem)
    report(problem)
    raise typer.Exit(code)
