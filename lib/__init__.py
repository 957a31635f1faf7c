"""The library the scripts share: one module per mechanism, each named for what it holds (README, The layout).

Each script imports this package before torch, so that a Ctrl-C while torch loads (the moment one
sees a typo in the command just typed) ends the script with one line, not a traceback through
torch's import; lib/cli.py, imported next, hands Ctrl-C back to Python.
"""
import signal
import sys


def _interrupted(signum, frame):
    sys.stderr.write("\ninterrupted\n")
    raise SystemExit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
