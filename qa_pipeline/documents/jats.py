"""PubMed Central JATS XML articles (``.nxml`` / ``.xml``): title, abstracts, body, back matter.

Reading order is kept; figure/table captions stay, table bodies go. One section per abstract and
per top-level body section. No DTD or external entity is ever fetched.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.entities import html5 as _HTML5_ENTITIES
from pathlib import Path
from typing import Any

from .model import Document, DocumentError, _collapse_ws, _read_bytes, _sanitise_id, join_blocks

logger = logging.getLogger(__name__)

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
            # Worded without angle brackets: the web page shows error messages as HTML.
            f"{path}: XML that declares entities (an ENTITY declaration in its DOCTYPE) is refused; a JATS article never needs "
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


def _render_blocks(blocks: list[_Block]) -> str:
    """A unit's text: a heading sits on its own line directly above its first paragraph; everything
    else is separated by a blank line."""
    parts: list[str] = []
    prev_kind: str | None = None
    for kind, text in blocks:
        if parts:
            parts.append("\n" if prev_kind == "heading" else "\n\n")
        parts.append(text)
        prev_kind = kind
    return "".join(parts)


def _article_to_document(article: ET.Element, doc_id: str, path: Path) -> Document:
    title_el = article.find("front/article-meta/title-group/article-title")
    title = _inline_text(title_el) if title_el is not None else ""
    # The title gets no section; each unit is one. A unit never ends with a heading (a container
    # without content yields no blocks), so units are always separated by a blank line.
    blocks: list[tuple[str | None, str]] = [(None, title)] if title else []
    blocks += [(unit_title, _render_blocks(unit)) for unit_title, unit in _jats_units(article) if unit]
    text, sections = join_blocks(blocks)
    if not sections:
        raise DocumentError(f"{path}: JATS article has no abstract or body text")
    return Document(
        doc_id=doc_id,
        title=title or path.stem,
        text=text,
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
