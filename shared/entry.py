"""`llava-queue`'s entry point (pyproject's [project.scripts]).

`shared.cli` takes about a second to import (pydantic, Celery, redis-py): a Ctrl-C meanwhile, the first thing a user
who changed their mind does, ended `llava-queue up` with a KeyboardInterrupt traceback. Imported here, it ends the
command quietly with status 130 (128 + SIGINT), as a Ctrl-C before any work has started should.
"""

import sys


def main() -> int:
    try:
        from shared.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print(file=sys.stderr)  # after the terminal's "^C"
        return 130
