"""Document loaders: turn files, pasted text and datasets into :class:`Document` objects.

Every loader produces one plain-text string per document (``Document.text``); all character
offsets anywhere in the pipeline (sections, chunks, answer spans) refer to that string.

Supported inputs (see :func:`load_documents`):

* ``.txt`` / ``.md``: UTF-8 text, one document per file.
* ``.pdf``: text layer extracted with pypdf (in a child process under a time and memory limit),
  one document per file, one section per page.
* ``.nxml`` / ``.xml``: PubMed Central JATS articles (title, abstract, body, acknowledgements).
* ``.json``: PubMedQA in its original format (an object keyed by PMID), one document per PMID.
* ``.jsonl``: one JSON object per line with a ``text`` or ``document`` field.

Bad input raises :class:`DocumentError` with a message naming the file and what is wrong, so the
UI / CLI can show it to the user as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.entities import html5 as _HTML5_ENTITIES
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DocumentError",
    "Section",
    "Document",
    "load_documents",
    "load_text",
    "iter_jsonl",
    "documents_from_dataset",
]

DEFAULT_MAX_BYTES = 50_000_000

TEXT_SUFFIXES = (".txt", ".md")
PDF_SUFFIXES = (".pdf",)
XML_SUFFIXES = (".nxml", ".xml")
JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + PDF_SUFFIXES + XML_SUFFIXES + JSON_SUFFIXES + JSONL_SUFFIXES

_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_ID_LEN = 128


class DocumentError(ValueError):
    """Bad input: message says which file and what is wrong."""


@dataclass
class Section:
    """A titled character span of :attr:`Document.text` (``text[start:end]``)."""

    title: str
    start: int  # character offset into Document.text
    end: int


@dataclass
class Document:
    """One loaded document.

    Attributes:
        doc_id: Stable id. For files the file stem (sanitised to ``[A-Za-z0-9._-]``), for PubMedQA
            the PMID, for JSONL rows the row's ``id``/``doc_id`` or ``<stem>-<line>``.
        title: Human-readable title (may be empty for pasted text).
        text: Full plain text; every offset anywhere refers to this string.
        source: Path or dataset name the document came from.
        sections: Non-overlapping titled spans of ``text``, in order.
        metadata: Extra JSON-serialisable information (format, PMID, question, ...).
    """

    doc_id: str
    title: str
    text: str
    source: str
    sections: list[Section] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _sanitise_id(raw: object, fallback: str = "doc") -> str:
    """Map an arbitrary id to ``[A-Za-z0-9._-]+`` so it is safe in file names and URLs."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("_")
    # A leading dot would give hidden files or ".." path components when ids become file names.
    text = text.lstrip(".")[:_MAX_ID_LEN]
    return text or fallback


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _collapse_ws(text: str) -> str:
    # str.split() with no argument splits on all Unicode whitespace (incl. NBSP / thin space),
    # which is what we want inside a paragraph of flowed XML text.
    return " ".join(text.split())


def _is_json_serialisable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _join_blocks(blocks: list[str], title_prefix: str) -> tuple[str, list[Section]]:
    """Join text blocks with blank lines; one section per non-empty block titled ``prefix i``."""
    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    for i, block in enumerate(blocks, 1):
        if parts:
            pos += 2
        parts.append(block)
        sections.append(Section(f"{title_prefix} {i}", pos, pos + len(block)))
        pos += len(block)
    return "\n\n".join(parts), sections


# --------------------------------------------------------------------------------------------
# Reading files safely
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a whole file after checking it exists, is a regular file, non-empty and small enough."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot access file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise DocumentError(f"{path}: is a directory, not a file")
    # Check the size before reading so a huge upload cannot exhaust memory.
    if st.st_size > max_bytes:
        raise DocumentError(f"{path}: file is {st.st_size:,} bytes, over the limit of {max_bytes:,} bytes")
    if st.st_size == 0:
        raise DocumentError(f"{path}: file is empty (0 bytes)")
    try:
        with path.open("rb") as fh:
            # Read one byte past the limit: the file may have grown since stat().
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise DocumentError(f"{path}: file is over the limit of {max_bytes:,} bytes")
    if not data:
        raise DocumentError(f"{path}: file is empty (0 bytes)")
    return data


def _check_not_binary(data: bytes, path: Path) -> None:
    """Reject data that is clearly not UTF-8 text, with a more helpful message than a decode error."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError(f"{path}: file is UTF-16 encoded; only UTF-8 text is supported")
    nul = data.find(b"\x00")
    if nul != -1:
        raise DocumentError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")
    sample = data[:8192]
    # Control characters other than tab/newline/form feed/carriage return/escape are rare in
    # real text; a high share of them means the file is binary even without NUL bytes.
    controls = sum(1 for b in sample if (b < 32 and b not in (9, 10, 12, 13, 27)) or b == 127)
    # The minimum count keeps one stray control byte in a tiny file from tripping the ratio.
    if controls >= 8 and controls / len(sample) > 0.05:
        raise DocumentError(
            f"{path}: looks like a binary file ({controls} control bytes in the first {len(sample)})"
        )


def _decode_utf8(data: bytes, path: Path) -> str:
    """Decode strict UTF-8 (BOM stripped, CRLF/CR -> LF); never silently replace bad bytes."""
    _check_not_binary(data, path)
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + bom
        raise DocumentError(
            f"{path}: invalid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); "
            "re-save the file as UTF-8"
        ) from None
    text = _normalise_newlines(text)
    if not text.strip():
        raise DocumentError(f"{path}: file contains only whitespace")
    return text


# --------------------------------------------------------------------------------------------
# Plain text and Markdown
# --------------------------------------------------------------------------------------------

_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_sections(text: str) -> tuple[str, list[Section]]:
    """Find ATX headings (outside code fences); return (first top-level heading, sections)."""
    headings: list[tuple[int, int, str]] = []  # (offset, level, title)
    in_fence = False
    pos = 0
    for line in text.split("\n"):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            m = _MD_HEADING.match(line)
            if m and m.group(2).strip():
                headings.append((pos, len(m.group(1)), m.group(2).strip()))
        pos += len(line) + 1
    sections = []
    for i, (start, _level, title) in enumerate(headings):
        end = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        end = start + len(text[start:end].rstrip())
        sections.append(Section(title, start, end))
    title = ""
    if headings:
        top = min(level for _, level, _ in headings)
        title = next(t for _, level, t in headings if level == top)
    return title, sections


def _load_text_file(path: Path, max_bytes: int) -> list[Document]:
    text = _decode_utf8(_read_bytes(path, max_bytes), path)
    title, sections = "", []
    fmt = "text"
    if path.suffix.lower() == ".md":
        fmt = "markdown"
        title, sections = _markdown_sections(text)
    return [
        Document(
            doc_id=_sanitise_id(path.stem),
            title=title or path.stem,
            text=text,
            source=str(path),
            sections=sections,
            metadata={"format": fmt},
        )
    ]


def load_text(text: str, *, doc_id: str | None = None, title: str = "", source: str = "pasted") -> Document:
    """Wrap pasted text in a :class:`Document`.

    Line endings are normalised (CRLF/CR -> LF) and offsets refer to the normalised text.

    Args:
        text: The document text.
        doc_id: Optional id (sanitised); defaults to ``"doc-"`` + the first 12 hex chars of the
            SHA-1 of the (normalised) text, so pasting the same text twice gives the same id.
        title: Optional title.
        source: Where the text came from, for display.

    Returns:
        The document, with no sections and ``metadata == {"format": "text"}``.

    Raises:
        DocumentError: If ``text`` is not a string or is empty / whitespace only.
    """
    if not isinstance(text, str):
        raise DocumentError(f"{source}: expected text as str, got {type(text).__name__}")
    # A byte-order mark pasted with the text (copied from a UTF-8-BOM file) is not content: files drop it too.
    text = _normalise_newlines(text.removeprefix("\ufeff"))
    if not text.strip():
        raise DocumentError(f"{source}: text is empty")
    if doc_id is None:
        doc_id = "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    else:
        doc_id = _sanitise_id(doc_id)
    return Document(doc_id=doc_id, title=title, text=text, source=source, metadata={"format": "text"})


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------


# pypdf runs in a child process with these limits, so a decompression bomb, a pathological
# content stream or a reader bug cannot exhaust the server's memory, hang it, or crash it.
PDF_TIMEOUT_S = 60.0
PDF_MEMORY_LIMIT_MB = 2048

# Runs in the child: reads the request from stdin, then hands over to _isolated_child_main. sys.path
# comes from the parent so the same modules are found however the parent was started.
_CHILD_BOOTSTRAP = (
    "import pickle, sys\n"
    "request = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = request['sys_path']\n"
    f"from {__name__} import _isolated_child_main\n"
    "_isolated_child_main(request)\n"
)


def _extract_pdf_text(data: bytes) -> dict[str, Any]:
    """Read a PDF with pypdf (runs in the child process; see :func:`_run_isolated`).

    Returns:
        JSON-serialisable ``{"page_texts", "num_pages", "title", "page_errors"}``: raw text per page,
        the page count, the metadata title (or ``None``) and ``[page_number, message]`` for each page
        whose text could not be extracted.

    Raises:
        DocumentError: For encrypted PDFs (message without the file name; the parent adds it).
        Exception: Anything pypdf raises on a broken file; the parent reports it as unreadable.
    """
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        # Many PDFs are "encrypted" with an empty user password only to set permissions.
        try:
            ok = reader.decrypt("")
        except (PyPdfError, NotImplementedError) as exc:
            raise DocumentError(f"PDF is encrypted and cannot be opened ({exc})") from None
        if not ok:
            raise DocumentError("PDF is password-protected")
    pages = list(reader.pages)
    page_texts: list[str] = []
    page_errors: list[list[Any]] = []
    for number, page in enumerate(pages, 1):
        try:
            page_texts.append(page.extract_text() or "")
        except Exception as exc:  # pypdf raises many exception types on broken content streams
            # One broken page should not lose the rest of the document.
            page_errors.append([number, f"{type(exc).__name__}: {exc}"[:300]])
            page_texts.append("")
    title = None
    try:
        if reader.metadata is not None and isinstance(reader.metadata.title, str):
            title = str(reader.metadata.title)
    except Exception:  # unreadable metadata only costs the title
        title = None
    return {"page_texts": page_texts, "num_pages": len(pages), "title": title, "page_errors": page_errors}


def _limit_memory(memory_mb: int) -> None:
    """Cap this process's address space (where the platform supports it)."""
    try:
        import resource
    except ImportError:  # not on POSIX: the time limit still applies
        return
    limit = memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _isolated_child_main(request: dict[str, Any]) -> None:
    """Child side of :func:`_run_isolated`: run the target, write one JSON reply to stdout."""
    import importlib
    import sys

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply
    reply: dict[str, Any]
    try:
        _limit_memory(request["memory_mb"])
        module_name, _, qualname = request["target"].partition(":")
        func: Any = importlib.import_module(module_name)
        for attr in qualname.split("."):
            func = getattr(func, attr)
        reply = {"ok": func(request["data"])}
    except DocumentError as exc:
        reply = {"error": "document", "message": str(exc)}
    except MemoryError:
        reply = {"error": "memory"}
    except BaseException as exc:  # the parent turns any failure into a DocumentError
        reply = {"error": "crash", "message": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        text = json.dumps(reply)
    except MemoryError:
        text = json.dumps({"error": "memory"})
    out.write(text)
    out.flush()


def _run_isolated(
    func: Callable[[bytes], Any], data: bytes, path: Path, *, timeout_s: float, memory_mb: int
) -> Any:
    """Run ``func(data)`` in a fresh Python process under a time and an address-space limit.

    ``func`` must be importable by its module and qualified name, and return JSON-serialisable
    data. A subprocess rather than multiprocessing: spawn would re-import the parent's
    ``__main__`` (the whole web app) in every child.

    Raises:
        DocumentError: Naming ``path`` (as given, never the child's tracebacks) when ``func``
            raises, runs out of time or memory, or the child dies.
    """
    import pickle
    import subprocess
    import sys

    request = {
        "sys_path": [p for p in sys.path if isinstance(p, str)],
        "target": f"{func.__module__}:{func.__qualname__}",
        "data": data,
        "memory_mb": memory_mb,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_BOOTSTRAP],
            input=pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise DocumentError(
            f"{path}: PDF could not be read within {timeout_s:g} s; it may be damaged or too complex"
        ) from None
    except OSError as exc:
        logger.error("could not start the PDF reader process: %s", exc)
        raise DocumentError(f"{path}: cannot read PDF (the PDF reader could not be started)") from None
    if proc.stderr:  # pypdf's own warnings about the file, for the server log
        logger.debug("%s: PDF reader said: %s", path, proc.stderr.decode("utf-8", "replace")[-2000:])
    try:
        reply = json.loads(proc.stdout)
        if not isinstance(reply, dict):
            raise ValueError("reply is not an object")
    except ValueError:
        reply = None
    if reply is None:  # the child died before replying (killed, crashed, out of memory at startup)
        stderr = proc.stderr.decode("utf-8", "replace")[-2000:]
        if "MemoryError" in stderr:
            reply = {"error": "memory"}
        else:
            logger.warning("%s: PDF reader exited with code %s: %s", path, proc.returncode, stderr)
            raise DocumentError(
                f"{path}: cannot read PDF (the PDF reader stopped with exit code {proc.returncode})"
            )
    if "ok" in reply:
        return reply["ok"]
    if reply.get("error") == "memory":
        raise DocumentError(
            f"{path}: PDF could not be read within {memory_mb:,} MB of memory; it may be damaged or a "
            "decompression bomb"
        )
    if reply.get("error") == "document":
        raise DocumentError(f"{path}: {reply.get('message')}")
    raise DocumentError(f"{path}: cannot read PDF ({reply.get('message')})")


def _load_pdf(path: Path, max_bytes: int) -> list[Document]:
    data = _read_bytes(path, max_bytes)
    if not data.lstrip().startswith(b"%PDF"):
        raise DocumentError(f"{path}: not a PDF file (no %PDF header)")
    # Looked up at call time so the module constants (and tests) can change the limits and extractor.
    result = _run_isolated(
        _extract_pdf_text, data, path, timeout_s=PDF_TIMEOUT_S, memory_mb=PDF_MEMORY_LIMIT_MB
    )
    try:
        page_texts = [str(t) for t in result["page_texts"]]
        num_pages = int(result["num_pages"])
        raw_title = result.get("title")
        page_errors = list(result.get("page_errors") or [])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DocumentError(f"{path}: cannot read PDF (unexpected reply from the PDF reader)") from None
    for number, message in page_errors:
        logger.warning("%s: could not extract text from page %s: %s", path, number, message)

    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    for number, page_text in enumerate(page_texts, 1):
        page_text = _normalise_newlines(page_text).strip()
        if not page_text:
            continue
        if parts:
            pos += 2
        sections.append(Section(f"Page {number}", pos, pos + len(page_text)))
        parts.append(page_text)
        pos += len(page_text)
    if not parts:
        raise DocumentError(
            f"{path}: PDF has no text layer (scanned PDF?); run OCR on it first or paste the text"
        )
    title = _collapse_ws(raw_title) if isinstance(raw_title, str) else ""
    return [
        Document(
            doc_id=_sanitise_id(path.stem),
            title=title or path.stem,
            text="\n\n".join(parts),
            source=str(path),
            sections=sections,
            metadata={"format": "pdf", "num_pages": num_pages, "pages_with_text": len(parts)},
        )
    ]


# --------------------------------------------------------------------------------------------
# PMC JATS XML
# --------------------------------------------------------------------------------------------

_XML_BUILTIN_ENTITIES = {"amp", "lt", "gt", "quot", "apos"}
_ENTITY_REF = re.compile(rb"&([A-Za-z][A-Za-z0-9._-]*);")
_ENTITY_DECL = re.compile(rb"<!ENTITY\s+(?:%\s+)?([A-Za-z_][A-Za-z0-9._-]*)")

# Elements whose whole subtree is noise for QA text (tables, images, reference lists, ...).
_JATS_SKIP = {
    "table",
    "graphic",
    "inline-graphic",
    "media",
    "supplementary-material",
    "ref-list",
    "fn-group",
    "object-id",
    "alt-text",
    "long-desc",
    "table-wrap-foot",
    "tex-math",
    "sec-meta",
    "permissions",
}
# Floating objects: their captions become paragraphs of their own, their content is dropped.
_JATS_FLOATS = {"fig", "table-wrap", "chem-struct-wrap"}
# Elements that hold paragraphs / sections rather than running text.
_JATS_BLOCK = {
    "p",
    "sec",
    "list",
    "list-item",
    "def-list",
    "def-item",
    "disp-quote",
    "boxed-text",
    "statement",
    "fig",
    "table-wrap",
    "fig-group",
    "table-wrap-group",
    "disp-formula",
    "disp-formula-group",
    "title",
    "label",
    "caption",
    "glossary",
    "app",
    "ack",
    "speech",
    "verse-group",
    "verse-line",
}
_ABSTRACT_TITLES = {
    None: "Abstract",
    "summary": "Author Summary",
    "author-summary": "Author Summary",
    "editor": "Editors' Summary",
    "editors-summary": "Editors' Summary",
    "executive-summary": "Executive Summary",
    "patient": "Patient Summary",
    "synopsis": "Synopsis",
}
# One-line teaser abstracts duplicate the real abstract; graphical abstracts are images.
_ABSTRACT_SKIP = {"toc", "teaser", "graphical", "short"}


def _resolve_named_entities(data: bytes) -> bytes:
    """Replace HTML/ISO named entities by numeric references.

    JATS files reference entities such as ``&nbsp;`` or ``&ndash;`` that are defined in the
    external DTD. We never fetch DTDs (no network, no XXE), so expat would reject them as
    undefined; numeric character references need no DTD. Entities declared in an internal
    subset and the five XML built-ins are left for expat. Unknown names are kept as literal
    text (``&name;``) rather than failing the whole article.
    """
    declared = {m.group(1).decode("ascii") for m in _ENTITY_DECL.finditer(data)}
    unknown: set[str] = set()

    def repl(m: re.Match[bytes]) -> bytes:
        name = m.group(1).decode("ascii")
        if name in _XML_BUILTIN_ENTITIES or name in declared:
            return m.group(0)
        value = _HTML5_ENTITIES.get(name + ";")
        if value is None:
            unknown.add(name)
            return b"&amp;" + m.group(1) + b";"
        return "".join(f"&#{ord(ch)};" for ch in value).encode("ascii")

    out = _ENTITY_REF.sub(repl, data)
    if unknown:
        logger.warning("unknown XML entities kept as literal text: %s", ", ".join(sorted(unknown)))
    return out


def _parse_xml(data: bytes, path: Path) -> ET.Element:
    """Parse XML with expat (no DTD or external entity is ever fetched) and strip namespaces.

    Entity declarations (``<!ENTITY``, internal or external) are refused: JATS never needs them, and
    one internal entity nested a few times turns a small file into gigabytes of text.
    """
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import DefusedXMLParser

    data = _resolve_named_entities(data)
    parser = DefusedXMLParser(forbid_dtd=False, forbid_entities=True, forbid_external=True)
    try:
        parser.feed(data)
        root = parser.close()
    except DefusedXmlException as exc:
        raise DocumentError(
            f"{path}: XML that declares entities (<!ENTITY ...>) is refused; a JATS article never needs "
            f"them, and they can expand a small file into a huge one ({type(exc).__name__})"
        ) from None
    except ET.ParseError as exc:
        raise DocumentError(f"{path}: not well-formed XML ({exc})") from None
    except LookupError as exc:  # unknown encoding="..." in the XML declaration
        raise DocumentError(f"{path}: unsupported XML encoding ({exc})") from None
    # JATS is usually un-namespaced, but some exports use a default namespace and MathML is
    # always namespaced; local names make the walker below namespace-agnostic.
    for elem in _iter_elements(root):
        if isinstance(elem.tag, str) and "}" in elem.tag:
            elem.tag = elem.tag.split("}", 1)[1]
    return root


def _iter_elements(root: ET.Element, tag: str | None = None) -> Iterator[ET.Element]:
    """``root.iter(tag)`` without recursion: same document order, any nesting depth.

    defusedxml builds pure-Python elements, whose ``iter()`` recurses once per level and so
    raises RecursionError on a few thousand nested elements.
    """
    stack = [root]
    while stack:
        elem = stack.pop()
        if tag is None or elem.tag == tag:
            yield elem
        stack.extend(reversed(elem))


class _NestingError(Exception):
    """Block structure nested deeper than :data:`_MAX_BLOCK_DEPTH`; the loader adds the file name."""


# Sections, lists and boxes nest a handful of levels in real articles; the block walker recurses
# once per level, so a cap keeps a hostile file from exhausting the stack.
_MAX_BLOCK_DEPTH = 100


def _pick_alternative(alternatives: ET.Element) -> ET.Element | None:
    """Choose the most text-like child of ``<alternatives>`` (MathML over TeX over images)."""
    children = list(alternatives)
    for child in children:
        if child.tag == "math":
            return child
    for child in children:
        if child.tag not in _JATS_SKIP:
            return child
    return None


def _inline_text(elem: ET.Element, floats: list[ET.Element] | None = None) -> str:
    """Flatten an element's running text (inline markup, MathML) into one normalised line.

    Floats met on the way (figures/tables inside a paragraph) are appended to ``floats`` so the
    caller can emit their captions after the paragraph.
    """
    parts: list[str] = []
    # An explicit stack instead of recursion, so any nesting depth works. Each entry is an element
    # to walk, a string to emit, or ("float", element); they are pushed in reverse so they pop in
    # document order, exactly as a recursive walk would visit them.
    stack: list[ET.Element | str | tuple[str, ET.Element]] = [elem]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        if isinstance(item, tuple):
            if floats is not None:
                floats.append(item[1])
            continue
        node = item
        if node.text:
            parts.append(node.text)
        todo: list[ET.Element | str | tuple[str, ET.Element]] = []
        for child in node:
            tag = child.tag
            if not isinstance(tag, str):
                pass
            elif tag in _JATS_FLOATS:
                todo.append(("float", child))
            elif tag in _JATS_SKIP:
                pass
            elif tag == "alternatives":
                pick = _pick_alternative(child)
                if pick is not None:
                    todo.append(pick)
            elif tag in _JATS_BLOCK or tag == "break":
                # Block boundaries inside running text (list items, nested p) need a separator.
                todo.extend((" ", child, " "))
            else:
                todo.append(child)
            if child.tail:
                todo.append(child.tail)
        stack.extend(reversed(todo))
    return _collapse_ws("".join(parts))


def _heading_of(elem: ET.Element) -> str:
    """``label title`` of a section-like element (``"2.1 Methods"``), or ``""``."""
    label = elem.find("label")
    title = elem.find("title")
    parts = [_inline_text(x) for x in (label, title) if x is not None]
    return " ".join(p for p in parts if p)


def _float_text(elem: ET.Element) -> str:
    """Caption of a figure/table as one paragraph: ``"Table 1: Title. Caption text."``."""
    label = elem.find("label")
    caption = elem.find("caption")
    label_text = _inline_text(label) if label is not None else ""
    caption_text = _inline_text(caption) if caption is not None else ""
    if label_text and caption_text:
        return f"{label_text}: {caption_text}"
    return label_text if caption_text == "" else caption_text


# A block is ("heading" | "para", text).
_Block = tuple[str, str]


def _container_blocks(elem: ET.Element, heading: str | None = None, depth: int = 0) -> list[_Block]:
    """Blocks for a section-like element: its heading line, then its content in reading order.

    Returns ``[]`` when there is no content, so e.g. a "Supporting Information" section holding
    only supplementary files leaves no orphan heading behind.

    Raises:
        _NestingError: If containers nest more than :data:`_MAX_BLOCK_DEPTH` levels deep.
    """
    if depth > _MAX_BLOCK_DEPTH:
        raise _NestingError
    body: list[_Block] = []
    for child in elem:
        if child.tag in ("title", "label"):
            continue
        _child_blocks(child, body, depth)
    if not body:
        return []
    if heading is None:
        heading = _heading_of(elem)
    return ([("heading", heading)] if heading else []) + body


def _child_blocks(child: ET.Element, out: list[_Block], depth: int = 0) -> None:
    tag = child.tag
    if not isinstance(tag, str) or tag in _JATS_SKIP:
        return
    if tag == "p":
        floats: list[ET.Element] = []
        text = _inline_text(child, floats)
        if text:
            out.append(("para", text))
        for f in floats:
            _child_blocks(f, out, depth)
    elif tag in _JATS_FLOATS:
        text = _float_text(child)
        if text:
            out.append(("para", text))
    elif tag == "def-item":
        term = child.find("term")
        definition = child.find("def")
        term_text = _inline_text(term) if term is not None else ""
        def_text = _inline_text(definition) if definition is not None else ""
        text = f"{term_text}: {def_text}" if term_text and def_text else term_text or def_text
        if text:
            out.append(("para", text))
    elif any(isinstance(g.tag, str) and g.tag in _JATS_BLOCK for g in child):
        # Containers (sec, list, boxed-text, ...): recurse, keeping their own title as heading.
        out.extend(_container_blocks(child, depth=depth + 1))
    else:
        # Anything else with running text (disp-formula, preformat, unknown tags) is a paragraph.
        text = _inline_text(child)
        if text:
            out.append(("para", text))


def _jats_units(article: ET.Element) -> list[tuple[str, list[_Block]]]:
    """Top-level (title, blocks) units in reading order: abstracts, body sections, back matter."""
    units: list[tuple[str, list[_Block]]] = []
    meta = article.find("front/article-meta")
    if meta is not None:
        for abstract in meta.findall("abstract"):
            kind = abstract.get("abstract-type")
            if kind in _ABSTRACT_SKIP:
                continue
            title = _heading_of(abstract) or _ABSTRACT_TITLES.get(
                kind, (kind or "").replace("-", " ").title()
            )
            blocks = _container_blocks(abstract, heading=title)
            if blocks:
                units.append((title, blocks))

    body = article.find("body")
    if body is not None:
        loose: list[_Block] = []  # content directly in <body>, outside any <sec>
        for child in body:
            if child.tag == "sec":
                if loose:
                    units.append(("Body", loose))
                    loose = []
                blocks = _container_blocks(child)
                if blocks:
                    title = blocks[0][1] if blocks[0][0] == "heading" else "Body"
                    units.append((title, blocks))
            else:
                _child_blocks(child, loose)
        if loose:
            units.append(("Body", loose))

    back = article.find("back")
    if back is not None:
        for child in back:
            if child.tag in ("ack", "sec", "glossary", "app", "notes"):
                default = "Acknowledgments" if child.tag == "ack" else ""
                heading = _heading_of(child) or default
                blocks = _container_blocks(child, heading=heading)
                if blocks:
                    units.append((heading or "Back matter", blocks))
            elif child.tag == "app-group":
                for app in child.findall("app"):
                    blocks = _container_blocks(app)
                    if blocks:
                        units.append((_heading_of(app) or "Appendix", blocks))

    floats_group = article.find("floats-group")
    if floats_group is not None:
        blocks = []
        for child in floats_group:
            _child_blocks(child, blocks)
        if blocks:
            units.append(("Figures and tables", blocks))
    return units


def _jats_metadata(article: ET.Element) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": "jats"}
    if article.get("article-type"):
        meta["article_type"] = article.get("article-type")
    for aid in article.findall("front/article-meta/article-id"):
        kind = aid.get("pub-id-type")
        value = (aid.text or "").strip()
        if not value:
            continue
        if kind == "pmid":
            meta.setdefault("pmid", value)
        elif kind in ("pmc", "pmcid"):
            meta.setdefault("pmcid", value if value.upper().startswith("PMC") else f"PMC{value}")
        elif kind == "doi":
            meta.setdefault("doi", value)
    journal = article.find("front/journal-meta/journal-title-group/journal-title")
    if journal is None:
        journal = article.find("front/journal-meta/journal-title")
    if journal is not None and _inline_text(journal):
        meta["journal"] = _inline_text(journal)
    for date in article.findall("front/article-meta/pub-date"):
        year = (date.findtext("year") or "").strip()
        if year.isdigit():
            meta["year"] = int(year)
            break
    return meta


def _article_to_document(article: ET.Element, doc_id: str, path: Path) -> Document:
    title_el = article.find("front/article-meta/title-group/article-title")
    title = _inline_text(title_el) if title_el is not None else ""

    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    prev_kind: str | None = None

    def append(kind: str, text: str) -> int:
        nonlocal pos, prev_kind
        if parts:
            # A heading sits on its own line directly above its first paragraph; everything
            # else is separated by a blank line.
            sep = "\n" if prev_kind == "heading" else "\n\n"
            parts.append(sep)
            pos += len(sep)
        start = pos
        parts.append(text)
        pos += len(text)
        prev_kind = kind
        return start

    if title:
        append("title", title)
    for unit_title, blocks in _jats_units(article):
        start = None
        for kind, text in blocks:
            offset = append(kind, text)
            start = offset if start is None else start
        if start is not None:
            sections.append(Section(unit_title, start, pos))

    if not sections:
        raise DocumentError(f"{path}: JATS article has no abstract or body text")
    return Document(
        doc_id=doc_id,
        title=title or path.stem,
        text="".join(parts),
        source=str(path),
        sections=sections,
        metadata=_jats_metadata(article),
    )


def _load_jats(path: Path, max_bytes: int) -> list[Document]:
    data = _read_bytes(path, max_bytes)
    if not data.strip():
        raise DocumentError(f"{path}: file contains only whitespace")
    root = _parse_xml(data, path)
    if root.tag == "article":
        articles = [root]
    else:
        # Wrappers such as <pmc-articleset> or OAI-PMH responses hold one or more articles.
        articles = list(_iter_elements(root, "article"))
    if not articles:
        raise DocumentError(f"{path}: not a JATS article (root element is <{root.tag}>, expected <article>)")
    stem = _sanitise_id(path.stem)
    try:
        if len(articles) == 1:
            return [_article_to_document(articles[0], stem, path)]
        return [_article_to_document(a, f"{stem}-{i}", path) for i, a in enumerate(articles, 1)]
    except _NestingError:
        raise DocumentError(
            f"{path}: JATS article is nested too deeply (sections, lists or boxes more than "
            f"{_MAX_BLOCK_DEPTH} levels deep); not a real article?"
        ) from None


# --------------------------------------------------------------------------------------------
# JSON rows (JSONL, datasets) and PubMedQA
# --------------------------------------------------------------------------------------------


def _row_text(value: object, where: str) -> tuple[str, list[Section]]:
    """Text (and sections) from a row's text field: a string, a list of strings, or a
    PubMedQA-style ``{"contexts": [...], "labels": [...]}`` mapping (the Hugging Face layout)."""
    if isinstance(value, str):
        text = _normalise_newlines(value)
        if not text.strip():
            raise DocumentError(f"{where}: document text is empty")
        return text, []
    if isinstance(value, Mapping) and "contexts" in value:
        return _contexts_text(value.get("contexts"), value.get("labels"), where)
    if isinstance(value, list | tuple):
        return _contexts_text(value, None, where)
    raise DocumentError(f"{where}: document text must be a string, got {type(value).__name__}")


def _contexts_text(contexts: object, labels: object, where: str) -> tuple[str, list[Section]]:
    """Join context paragraphs with blank lines; one section per context, titled by its label."""
    if not isinstance(contexts, list | tuple) or not all(isinstance(c, str) for c in contexts):
        raise DocumentError(f"{where}: contexts must be a list of strings")
    if not isinstance(labels, list | tuple) or len(labels) != len(contexts):
        if labels is not None:
            logger.warning(
                "%s: %s labels for %s contexts; using numbered sections",
                where,
                len(labels) if isinstance(labels, list | tuple) else "no",
                len(contexts),
            )
        labels = [None] * len(contexts)
    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    for i, (context, label) in enumerate(zip(contexts, labels, strict=True), 1):
        context = _normalise_newlines(context).strip()
        if not context:
            continue
        if parts:
            pos += 2
        title = str(label).strip().title() if label else f"Context {i}"
        sections.append(Section(title, pos, pos + len(context)))
        parts.append(context)
        pos += len(context)
    if not parts:
        raise DocumentError(f"{where}: document has no non-empty contexts")
    return "\n\n".join(parts), sections


def _extra_metadata(row: Mapping[str, Any], exclude: set[str], where: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in row.items():
        if key in exclude:
            continue
        if _is_json_serialisable(value):
            meta[str(key)] = value
        else:
            logger.debug("%s: dropping non-JSON-serialisable field %r", where, key)
    return meta


class _UniqueIds:
    """Reject duplicate doc ids: downstream stores key documents by id."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def add(self, doc_id: str, where: str) -> None:
        if doc_id in self._seen:
            raise DocumentError(
                f"{where}: duplicate document id {doc_id!r} (first seen at {self._seen[doc_id]})"
            )
        self._seen[doc_id] = where


def _document_from_row(
    row: Mapping[str, Any],
    *,
    where: str,
    source: str,
    default_id: str,
    text_fields: tuple[str, ...],
    id_fields: tuple[str, ...],
    title_fields: tuple[str, ...],
    extra: dict[str, Any],
) -> Document:
    text_key = next((k for k in text_fields if k in row), None)
    if text_key is None:
        raise DocumentError(f"{where}: row has no {' or '.join(repr(k) for k in text_fields)} field")
    text, sections = _row_text(row[text_key], where)
    id_key = next((k for k in id_fields if k in row and row[k] is not None), None)
    doc_id = _sanitise_id(row[id_key], default_id) if id_key else default_id
    title_key = next((k for k in title_fields if k in row), None)
    title = _collapse_ws(str(row[title_key])) if title_key and row[title_key] is not None else ""
    used = {k for k in (text_key, id_key, title_key) if k}
    metadata = {**_extra_metadata(row, used, where), **extra}
    return Document(
        doc_id=doc_id, title=title, text=text, source=source, sections=sections, metadata=metadata
    )


def iter_jsonl(
    path: str | os.PathLike[str], *, on_error: Callable[[int, str], None] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, obj)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based. A malformed line (invalid UTF-8, invalid JSON, or a JSON value that
    is not an object) calls ``on_error(line_number, message)`` and is skipped when ``on_error`` is
    given, so the remaining rows are still processed; otherwise it raises.

    Args:
        path: The ``.jsonl`` file.
        on_error: Optional callback for malformed lines.

    Yields:
        ``(line_number, obj)`` with ``obj`` a dict.

    Raises:
        DocumentError: If the file cannot be opened, or on a malformed line without ``on_error``;
            the message names the file and the line number.
    """
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DocumentError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot open file ({exc.strerror or exc})") from None
    with fh:
        for line_number, raw in enumerate(fh, 1):
            if line_number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if not raw.strip():
                continue
            message = None
            obj: Any = None
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                message = f"{path}: line {line_number}: invalid UTF-8 at byte {exc.start} of the line"
            except json.JSONDecodeError as exc:
                message = f"{path}: line {line_number}: malformed JSON ({exc.msg} at column {exc.colno})"
            else:
                if not isinstance(obj, dict):
                    message = f"{path}: line {line_number}: expected a JSON object, got {type(obj).__name__}"
            if message is not None:
                if on_error is None:
                    raise DocumentError(message)
                on_error(line_number, message)
                continue
            yield line_number, obj


def _load_jsonl(path: Path, max_bytes: int) -> list[Document]:
    # Read once for the size / empty / binary checks so failures have a clear file-level message.
    data = _read_bytes(path, max_bytes)
    _check_not_binary(data, path)
    del data
    stem = _sanitise_id(path.stem)
    ids = _UniqueIds()
    docs = []
    for line_number, row in iter_jsonl(path):
        where = f"{path}: line {line_number}"
        doc = _document_from_row(
            row,
            where=where,
            source=str(path),
            default_id=f"{stem}-{line_number}",
            text_fields=("text", "document"),
            id_fields=("id", "doc_id"),
            title_fields=("title",),
            extra={"format": "jsonl", "line": line_number},
        )
        ids.add(doc.doc_id, where)
        docs.append(doc)
    if not docs:
        raise DocumentError(f"{path}: file contains only blank lines")
    return docs


def _is_pubmedqa(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(
        isinstance(v, Mapping) and ("CONTEXTS" in v or "QUESTION" in v) for v in obj.values()
    )


def _pubmedqa_documents(obj: Mapping[str, Any], path: Path) -> list[Document]:
    docs = []
    for pmid, entry in obj.items():
        where = f"{path}: PMID {pmid}"
        if "CONTEXTS" not in entry:
            raise DocumentError(f"{where}: missing CONTEXTS")
        text, sections = _contexts_text(entry["CONTEXTS"], entry.get("LABELS"), where)
        metadata: dict[str, Any] = {
            "format": "pubmedqa",
            "pmid": str(pmid),
            "question": entry.get("QUESTION"),
            "final_decision": entry.get("final_decision"),
            "long_answer": entry.get("LONG_ANSWER"),
        }
        # Keep the remaining fields (MESHES, YEAR, reasoning_* ...) under lower-case names.
        for key, value in entry.items():
            if key in ("CONTEXTS", "QUESTION", "final_decision", "LONG_ANSWER"):
                continue
            if _is_json_serialisable(value):
                metadata.setdefault(str(key).lower(), value)
        docs.append(
            Document(
                doc_id=_sanitise_id(pmid),
                title=f"PMID {pmid}",
                text=text,
                source=str(path),
                sections=sections,
                metadata=metadata,
            )
        )
    return docs


def _load_json(path: Path, max_bytes: int) -> list[Document]:
    text = _decode_utf8(_read_bytes(path, max_bytes), path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if isinstance(obj, dict) and _is_pubmedqa(obj):
        return _pubmedqa_documents(obj, path)
    rows: list[Any]
    if isinstance(obj, dict) and ("text" in obj or "document" in obj):
        rows = [obj]  # a single document object
    elif isinstance(obj, list):
        rows = obj  # a list of document objects, like JSONL in one array
    else:
        raise DocumentError(
            f"{path}: unrecognised JSON layout; expected PubMedQA (an object keyed by PMID whose "
            "values have QUESTION and CONTEXTS), a document object with 'text', or a list of those"
        )
    stem = _sanitise_id(path.stem)
    ids = _UniqueIds()
    docs = []
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise DocumentError(f"{where}: expected a JSON object, got {type(row).__name__}")
        doc = _document_from_row(
            row,
            where=where,
            source=str(path),
            default_id=stem if len(rows) == 1 else f"{stem}-{i}",
            text_fields=("text", "document"),
            id_fields=("id", "doc_id"),
            title_fields=("title",),
            extra={"format": "json"},
        )
        ids.add(doc.doc_id, where)
        docs.append(doc)
    if not docs:
        raise DocumentError(f"{path}: JSON list is empty")
    return docs


def documents_from_dataset(
    dataset: Iterable[Mapping[str, Any]],
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
) -> list[Document]:
    """Convert a ``datasets.Dataset`` (or any iterable of dicts) to documents.

    The text field may hold a string, a list of strings (joined with blank lines, one section
    each) or a PubMedQA-style ``{"contexts": [...], "labels": [...]}`` mapping as in the Hugging
    Face ``pubmed_qa`` dataset (``text_field="context", id_field="pubid"``). All other
    JSON-serialisable fields are kept in ``metadata``.

    Args:
        dataset: The rows.
        text_field: Field holding the document text.
        id_field: Field holding the document id; rows are numbered ``row-<i>`` when omitted.
        title_field: Field holding the title; titles are empty when omitted.

    Returns:
        One document per row, in order.

    Raises:
        DocumentError: If a row lacks a field, has empty text, or ids repeat; the message names
            the row index.
    """
    if isinstance(dataset, Mapping):
        raise DocumentError(
            "dataset: got a mapping (a DatasetDict?); pass a single split, e.g. dataset['train']"
        )
    source = "dataset"
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if isinstance(name, str) and name:
        source = name
    ids = _UniqueIds()
    docs = []
    for i, row in enumerate(dataset):
        where = f"{source}: row {i}"
        if not isinstance(row, Mapping):
            raise DocumentError(f"{where}: expected a mapping, got {type(row).__name__}")
        if id_field is not None and row.get(id_field) is None:
            raise DocumentError(f"{where}: row has no {id_field!r} field")
        doc = _document_from_row(
            row,
            where=where,
            source=source,
            default_id=f"row-{i}",
            text_fields=(text_field,),
            id_fields=(id_field,) if id_field else (),
            title_fields=(title_field,) if title_field else (),
            extra={"row": i},
        )
        ids.add(doc.doc_id, where)
        docs.append(doc)
    return docs


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path, int], list[Document]]] = {
    **dict.fromkeys(TEXT_SUFFIXES, _load_text_file),
    **dict.fromkeys(PDF_SUFFIXES, _load_pdf),
    **dict.fromkeys(XML_SUFFIXES, _load_jats),
    **dict.fromkeys(JSON_SUFFIXES, _load_json),
    **dict.fromkeys(JSONL_SUFFIXES, _load_jsonl),
}


def load_documents(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """Load the document(s) in one file, dispatching on its suffix (case-insensitive).

    * ``.txt`` / ``.md``: one document; strict UTF-8 (a BOM is stripped), CRLF/CR normalised to
      LF, so offsets refer to the normalised text. Markdown ATX headings become sections and the
      first top-level heading the title.
    * ``.pdf``: one document, text layer via pypdf, pages joined with blank lines, one section
      ``"Page N"`` per page with text. pypdf runs in a child process limited to
      :data:`PDF_TIMEOUT_S` seconds and :data:`PDF_MEMORY_LIMIT_MB` of address space.
    * ``.nxml`` / ``.xml``: PMC JATS article: title, abstract(s), body sections and paragraphs in
      reading order, acknowledgements; figure/table captions kept, table bodies dropped. One
      section per abstract and per top-level body section.
    * ``.json``: PubMedQA original format (object keyed by PMID) -> one document per PMID, the
      CONTEXTS joined with blank lines, one section per context titled by its LABEL; question,
      final_decision and long_answer in ``metadata``. A single ``{"text": ...}`` object or a list
      of such objects is also accepted.
    * ``.jsonl``: one document per non-blank line, from ``text`` or ``document`` with optional
      ``id``/``doc_id`` and ``title``; other fields go to ``metadata``.

    Args:
        path: The file.
        max_bytes: Refuse files larger than this (checked before reading).

    Returns:
        The documents, in file order.

    Raises:
        DocumentError: On any bad input (missing, empty, binary, not UTF-8, too big, unknown
            suffix, malformed JSON/JSONL/XML, not JATS, PDF without text layer, ...).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    loader = _LOADERS.get(suffix)
    if loader is None:
        raise DocumentError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    docs = loader(path, max_bytes)
    logger.debug("loaded %d document(s) from %s", len(docs), path)
    return docs
