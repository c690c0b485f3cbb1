"""User mistakes: one short message that names the problem and the fix, no traceback.

Code that checks what the user gave raises :class:`UserError` (or :class:`MissingFileError`
for a path that does not exist); the commands (``train.py``, ``sample.py``, ``evaluate.py``, ``edit.py``,
``python -m miniworld[.study|.quality|.hifi_generation]``)
run their ``main`` through :func:`run_command`, which prints such an error as one short
message and exits with status 2. Every other exception is a bug and keeps its traceback.
``--debug`` on any command line, or ``PERSONALIZE_DEBUG=1``, shows the traceback of user
errors too.

    raise UserError("--num-images is 0", fix="pass --num-images 1 or more")
    # sample.py: error: --num-images is 0
    #   fix: pass --num-images 1 or more
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, NoReturn, Sequence

DEBUG_FLAG, DEBUG_ENV = "--debug", "PERSONALIZE_DEBUG"
EXIT_USER_ERROR = 2  # as argparse's usage errors


class UserError(ValueError):
    """A mistake the user can fix (bad setting, missing or broken input, unknown name).

    A ``ValueError``, so code and tests that catch ``ValueError`` keep working.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


def settings_check(init: Callable) -> Callable:
    """Decorate a constructor that validates a user's settings (a callback's in a config): a
    ValueError it raises becomes a UserError with the same message, so train.py prints it as
    one line instead of jsonargparse's traceback. The original stays chained (``--debug``)."""

    @functools.wraps(init)
    def checked(*args, **kwargs):
        try:
            return init(*args, **kwargs)
        except UserError:
            raise
        except ValueError as err:
            raise UserError(str(err)) from err

    return checked


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_user_error(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with status 2 (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None


def find_user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind ``err``: itself, or one it was raised from (libraries such as
    jsonargparse wrap exceptions raised while building the model or the data)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_command(main: Callable, argv: Sequence[str] | None = None, prog: str | None = None):
    """Run ``main(argv)``; a user error becomes one short message on stderr and exit status 2.

    ``--debug`` is taken out of the command line (the commands never see it) and, like
    ``PERSONALIZE_DEBUG=1``, lets user errors raise with their traceback. With ``argv=None``
    the command line is ``sys.argv``, edited in place: processes that Lightning launches
    for the other ranks re-run it and inherit ``PERSONALIZE_DEBUG``.
    """
    debug = debug_requested(argv)
    if argv is None:
        sys.argv[1:] = [a for a in sys.argv[1:] if a != DEBUG_FLAG]
        if debug:
            os.environ[DEBUG_ENV] = "1"
    else:
        argv = [a for a in argv if a != DEBUG_FLAG]
    prog = prog or os.path.basename(sys.argv[0] or "personalize")
    try:
        return main(argv)
    except BaseException as err:  # noqa: BLE001 - re-raised below unless it is a user mistake
        user_error = None if debug or isinstance(err, (SystemExit, KeyboardInterrupt)) else find_user_error(err)
        if user_error is None:
            raise
        exit_user_error(prog, user_error)
