"""The one family of errors a user can cause, and how a command reports one.

Every mistake a user can make -- a bad file, key, option value, request, layout or adapter --
raises a subclass of :class:`MoeloraError` whose message is one line naming the thing (file,
layer, key, option) and the fix. Nothing else is a user error: any other exception is a bug
here and keeps its traceback. The command-line entry points catch the family, print the one
line and exit with :data:`USER_ERROR_EXIT` (2), before any heavy work where the check allows.

This module imports nothing of the package, so every layer can raise these.
"""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class MoeloraError(ValueError):
    """A user mistake; ``str(exc)`` is one line that names the problem and the fix.

    A ``ValueError`` so that callers written against the built-in type keep working.
    """


class FileError(MoeloraError):
    """A file that cannot be read or written as asked (missing, unreadable, corrupt, not a
    regular file); the message names the path and the real cause."""


class OptionError(MoeloraError):
    """A command-line option or API argument with a value that cannot work."""


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so an error stays one line on a terminal."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report_user_error(prog: str, exc: BaseException) -> int:
    """Report ``"<prog>: error: <message>"`` (one line); return the exit code (2).

    On one process: printed on stderr. In a rank of a torchelastic job
    (``$TORCHELASTIC_ERROR_FILE`` set): also written to that rank's error file in torchelastic's
    JSON format, so the launcher's (or torchrun's) failure report shows it; and when the rank
    is a direct child of ``moelora-launch`` (its pid in ``$MOELORA_LAUNCH_PID``, see
    ``moelora_dist/parallel/launch_env.py``) nothing is printed here: the launcher prints the
    line once for the job instead of once per rank.
    """
    import json
    import os
    import time

    line = f"{prog}: error: {one_line(str(exc))}"
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    written = False
    if path:
        data = {"message": {"message": line, "extraInfo": {
            "timestamp": str(int(time.time())), "user_error": True, "exit_code": USER_ERROR_EXIT,
            "error_type": type(exc).__name__}}}
        try:  # atomic: the launcher may stop this rank mid-write
            with open(f"{path}.tmp", "w") as fh:
                json.dump(data, fh)
            os.replace(f"{path}.tmp", path)
            written = True
        except OSError:
            pass  # no error file: the line below is the only report
    # A grandchild of the launcher inherits the variable but is nobody's rank: it prints.
    under_launcher = os.environ.get("MOELORA_LAUNCH_PID") == str(os.getppid())
    if not (written and under_launcher):
        print(line, file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
