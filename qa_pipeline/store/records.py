"""Errors and records of the memory store, and the validation of incoming segment spans."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """Any problem with a memory store; the message is meant to be shown to the user as is."""


class StoreMismatch(StoreError):
    """The store was written by a different model (fingerprint differs)."""


class UnknownDocument(StoreError, KeyError):
    """No document with that id in the store."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes; show it like any other error.
        return str(self.args[0]) if self.args else ""


class DocumentExists(StoreError):
    """A document with that id is already stored and ``replace`` was not requested."""


@dataclass
class SegmentInfo:
    """Where one HMT segment lies in its document (token and character half-open spans)."""

    doc_id: str
    idx: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass
class DocumentInfo:
    """A stored document's catalogue entry (without its text)."""

    doc_id: str
    title: str
    source: str
    n_tokens: int
    n_segments: int
    created_at: str
    metadata: dict = field(default_factory=dict)
    # Changes whenever the document is written (its folder's name): a cache key that a replace in
    # the same second, by another process, still changes.
    version: str = ""


@dataclass(frozen=True)
class _DocRow:
    """Where a document's files live (internal)."""

    doc_id: str
    dir: str
    indexes: tuple[str, ...]


def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer; got {value!r}") from None


def _coerce_segment(seg: Any, doc_id: str, position: int) -> SegmentInfo:
    """Accept a SegmentInfo, a mapping or a tuple and return a validated SegmentInfo.

    Tuples may be ``(token_start, token_end, char_start, char_end)`` (idx = position),
    ``(idx, token_start, token_end, char_start, char_end)`` or the six SegmentInfo fields.
    """
    names = ("idx", "token_start", "token_end", "char_start", "char_end")
    if isinstance(seg, SegmentInfo):
        if seg.doc_id not in ("", doc_id):
            raise ValueError(f"segment {position} belongs to document {seg.doc_id!r}, not {doc_id!r}")
        raw: Sequence[Any] = (seg.idx, seg.token_start, seg.token_end, seg.char_start, seg.char_end)
    elif isinstance(seg, Mapping):
        try:
            raw = [seg.get("idx", position)] + [seg[n] for n in names[1:]]
        except KeyError as exc:
            raise ValueError(f"segment {position} lacks field {exc.args[0]!r}") from None
    else:
        try:
            tup = tuple(seg)
        except TypeError:
            raise ValueError(f"segment {position} must be a SegmentInfo or a tuple; got {seg!r}") from None
        if len(tup) == 4:
            raw = (position, *tup)
        elif len(tup) == 5:
            raw = tup
        elif len(tup) == 6:
            if tup[0] not in ("", doc_id):
                raise ValueError(f"segment {position} belongs to document {tup[0]!r}, not {doc_id!r}")
            raw = tup[1:]
        else:
            raise ValueError(f"segment {position} must have 4, 5 or 6 fields; got {len(tup)}")
    idx, ts, te, cs, ce = (_as_int(v, f"segment {position} {n}") for v, n in zip(raw, names, strict=True))
    if idx != position:
        # Row i of every per-segment array is segment i, so indices must be 0..n-1 in order.
        raise ValueError(
            f"segment at position {position} has idx {idx}; segments must be numbered 0..n-1 in order"
        )
    if not 0 <= ts <= te:
        raise ValueError(f"segment {idx} has a bad token span [{ts}, {te})")
    if not 0 <= cs <= ce:
        raise ValueError(f"segment {idx} has a bad character span [{cs}, {ce})")
    return SegmentInfo(doc_id, idx, ts, te, cs, ce)
