"""Document loaders: turn files and pasted text into :class:`Document` objects.

Every loader produces one plain-text string per document (``Document.text``); all character
offsets anywhere in the pipeline (sections, chunks, answer spans) refer to that string.

Supported inputs (see :func:`load_documents`), one module each:

* ``.txt`` / ``.md`` (:mod:`.text`): UTF-8 text, one document per file; also pasted text.
* ``.pdf`` (:mod:`.pdf`): text layer extracted with pypdf (in a child process under a time and
  memory limit), one document per file, one section per page.
* ``.nxml`` / ``.xml`` (:mod:`.jats`): PubMed Central JATS articles (title, abstract, body,
  acknowledgements).
* ``.json`` (:mod:`.pubmedqa`): PubMedQA in its original format (an object keyed by PMID), one
  document per PMID; other JSON documents (:mod:`.json_rows`).
* ``.jsonl`` (:mod:`.json_rows`): one JSON object per line with a ``text`` or ``document`` field.

:mod:`.model` holds the dataclasses and shared helpers, :mod:`.load` the dispatch on the suffix.

Bad input raises :class:`DocumentError` with a message naming the file and what is wrong, so the
UI / CLI can show it to the user as is.
"""

from .json_rows import iter_jsonl
from .load import DEFAULT_MAX_BYTES, SUPPORTED_SUFFIXES, load_documents
from .model import Document, DocumentError, Section
from .text import load_text

__all__ = [
    "DocumentError",
    "Section",
    "Document",
    "load_documents",
    "load_text",
    "iter_jsonl",
    "DEFAULT_MAX_BYTES",
    "SUPPORTED_SUFFIXES",
]
