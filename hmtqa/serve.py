"""``hmtqa serve``: the web UI, same as ``python app.py``."""

from __future__ import annotations

import argparse


def cmd_serve(ns: argparse.Namespace) -> int:
    # Imported here: the UI (gradio) is only needed when serving, not for every hmtqa command.
    from app.server import serve
    from app.settings import settings_from_args

    from .main import CLIError

    try:
        settings = settings_from_args(ns)
    except ValueError as err:
        raise CLIError(str(err)) from err
    return serve(settings)


def register(sub: argparse._SubParsersAction) -> None:
    # The flags live with the app so that `python app.py` and `hmtqa serve` cannot drift apart.
    from app.settings import add_serve_arguments

    p = sub.add_parser("serve", help="start the web UI (same as `python app.py`)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
