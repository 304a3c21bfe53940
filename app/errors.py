"""The one exception type the UI shows to users as is."""

from __future__ import annotations


class AppError(Exception):
    """A problem the user can fix (bad upload, unknown document, empty question...).

    The message is complete and meant to be shown verbatim; the UI turns it into ``gr.Error``.
    """
