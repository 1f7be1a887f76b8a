import os
import sys

from circuitlib.cli import main

try:
    status = main()
    sys.stdout.flush()
except BrokenPipeError:
    # The reader went away (`... | head`): stop quietly, as command-line tools do. Python would
    # otherwise print a traceback, and again at exit when it flushes stdout into the closed pipe.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
raise SystemExit(status)
