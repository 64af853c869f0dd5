"""The root click group, the ``bench`` group and the error boundary of the CLI."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

import click

from fastserve.errors import FastServeError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fastserve")
def cli() -> None:
    """FastServe: compile a model into a graph, cut it into shards, plan where they run, and run
    them on rank processes connected by ZeroMQ.

    \b
    Quick start:
      fastserve compile graphs/gpt2.yaml        # nodes, params, FLOPs per sample
      fastserve check graphs/mlp.yaml           # build weights, run the reference
      fastserve run graphs/gpt2.yaml --check    # distributed run vs the reference

    Set FASTSERVE_DEBUG=1 to see Python tracebacks on errors.
    """


@cli.group()
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way swallows it and every ``with Deployment`` on the way stops its
    ranks and removes its socket directory."""


@contextmanager
def _terminate_as_exception():
    """Turn SIGTERM into :class:`Terminated` while the CLI runs (main thread only: Python
    delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        # a second SIGTERM must not cut short the orderly stop that the first one starts (an
        # authenticator thread left half-stopped hangs the interpreter's exit); SIGKILL remains
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(argv: list[str]) -> int:
    """Run the CLI on ``argv``; return the exit code. No traceback reaches the user unless
    FASTSERVE_DEBUG is set. SIGTERM exits 143 and SIGINT 130, after the ranks have stopped."""
    try:
        with _terminate_as_exception():
            cli.main(args=argv, prog_name="fastserve", standalone_mode=False)
        return 0
    except Terminated:
        click.echo("terminated: stopped the ranks and removed their files", err=True)
        return 143
    except FastServeError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt (SIGINT)
        click.echo("interrupted: stopped the ranks and removed their files", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted: stopped the ranks and removed their files", err=True)
        return 130
    except Exception as e:  # the last line of defence: one line, not a traceback
        if os.environ.get("FASTSERVE_DEBUG"):
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e} (set FASTSERVE_DEBUG=1 for a "
                   f"traceback, and please report it)", err=True)
        return 1
    finally:
        sys.stdout.flush()
