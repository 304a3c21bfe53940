"""Tests for qa_pipeline.documents (document loaders).

Over 500 lines: the tests of every document loader (text, Markdown, PDF, JATS, PubMedQA, JSONL).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
from pathlib import Path

import pytest

from qa_pipeline.documents import (
    Document,
    DocumentError,
    Section,
    iter_jsonl,
    load_documents,
    load_text,
)

SHARED_PMC = Path("/work/shared/data/pmc-oa")


def assert_valid_sections(doc: Document) -> None:
    """Sections are in order, non-overlapping, inside the text and not padded with whitespace."""
    prev_end = 0
    for s in doc.sections:
        assert isinstance(s, Section)
        assert prev_end <= s.start < s.end <= len(doc.text), s
        span = doc.text[s.start : s.end]
        assert span == span.strip(), f"section {s.title!r} has surrounding whitespace"
        prev_end = s.end
    json.dumps(doc.metadata)  # must be JSON-serialisable


def section_text(doc: Document, title: str) -> str:
    matches = [s for s in doc.sections if s.title == title]
    assert len(matches) == 1, [s.title for s in doc.sections]
    return doc.text[matches[0].start : matches[0].end]


# ------------------------------------------------------------------------------------------
# Pasted text
# ------------------------------------------------------------------------------------------


def test_load_text_default_id_is_sha1_prefix():
    text = "Aspirin reduces fever.\nIt also thins blood."
    doc = load_text(text)
    assert doc.doc_id == "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    assert doc.text == text
    assert doc.source == "pasted"
    assert doc.title == ""
    assert doc.sections == []


def test_load_text_normalises_crlf_and_keeps_id_stable():
    assert load_text("a\r\nb\rc").text == "a\nb\nc"
    # The same text pasted with different line endings is the same document.
    assert load_text("a\r\nb").doc_id == load_text("a\nb").doc_id


def test_load_text_explicit_id_title_and_source():
    doc = load_text("Some text", doc_id="my doc/../1", title="T", source="upload")
    assert doc.doc_id == "my_doc_.._1"
    assert doc.title == "T"
    assert doc.source == "upload"


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_load_text_rejects_empty(text):
    with pytest.raises(DocumentError, match="empty"):
        load_text(text)


# ------------------------------------------------------------------------------------------
# Text and Markdown files
# ------------------------------------------------------------------------------------------


def test_txt_strips_bom_normalises_crlf_and_sanitises_id(tmp_path):
    path = tmp_path / "My report (v2).txt"
    path.write_bytes(b"\xef\xbb\xbfLine one\r\nLine two\r\n")
    [doc] = load_documents(path)
    assert doc.text == "Line one\nLine two\n"
    assert doc.doc_id == "My_report_v2"
    assert doc.title == "My report (v2)"
    assert doc.source == str(path)
    assert doc.metadata == {"format": "text"}


def test_txt_accepts_str_path_and_uppercase_suffix(tmp_path):
    path = tmp_path / "NOTES.TXT"
    path.write_text("héllo wörld", encoding="utf-8")
    [doc] = load_documents(str(path))
    assert doc.text == "héllo wörld"
    assert doc.doc_id == "NOTES"


def test_markdown_headings_become_sections(tmp_path):
    md = "# Title of paper\n\nIntro text.\n\n## Methods\n\nWe did things.\n\n```\n# not a heading\n```\n\n## Results\n\nIt worked.\n"
    path = tmp_path / "paper.md"
    path.write_text(md, encoding="utf-8")
    [doc] = load_documents(path)
    assert doc.title == "Title of paper"
    assert [s.title for s in doc.sections] == ["Title of paper", "Methods", "Results"]
    assert section_text(doc, "Methods").startswith("## Methods\n\nWe did things.")
    assert "# not a heading" in section_text(doc, "Methods")
    assert section_text(doc, "Results") == "## Results\n\nIt worked."
    assert doc.metadata["format"] == "markdown"
    assert_valid_sections(doc)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".md", ".json", ".jsonl", ".xml", ".nxml", ".pdf"])
def test_zero_byte_file_is_rejected(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DocumentError, match=r"empty \(0 bytes\)") as exc:
        load_documents(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".xml"])
def test_whitespace_only_file_is_rejected(tmp_path, suffix):
    path = tmp_path / f"blank{suffix}"
    path.write_text(" \n\n\t \r\n", encoding="utf-8")
    with pytest.raises(DocumentError, match="only whitespace"):
        load_documents(path)


def test_whitespace_only_jsonl_is_rejected(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DocumentError, match="only blank lines"):
        load_documents(path)


def test_nul_bytes_mean_binary(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"GIF89a\x00\x01\x02 some text")
    with pytest.raises(DocumentError, match="binary") as exc:
        load_documents(path)
    assert "image.txt" in str(exc.value)


def test_random_bytes_are_rejected_as_binary(tmp_path):
    path = tmp_path / "random.txt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(DocumentError, match="binary"):
        load_documents(path)


def test_control_bytes_without_nul_are_rejected_as_binary(tmp_path):
    path = tmp_path / "ctrl.txt"
    path.write_bytes(bytes(range(1, 9)) * 100)
    with pytest.raises(DocumentError, match="binary"):
        load_documents(path)


def test_single_stray_control_byte_is_still_text(tmp_path):
    path = tmp_path / "form.txt"
    path.write_bytes(b"Page one\x0cPage two\x07")
    [doc] = load_documents(path)
    assert doc.text == "Page one\x0cPage two\x07"


def test_invalid_utf8_reports_byte_offset_and_is_not_replaced(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))  # 0xe9 at byte offset 3
    with pytest.raises(DocumentError, match=r"invalid UTF-8 at byte offset 3 \(byte 0xe9\)"):
        load_documents(path)


def test_invalid_utf8_offset_counts_the_bom(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(DocumentError, match="byte offset 5"):
        load_documents(path)


def test_utf16_gets_specific_message(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes("hello".encode("utf-16"))
    with pytest.raises(DocumentError, match="UTF-16"):
        load_documents(path)


def test_file_over_max_bytes_is_rejected_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("x" * 1001, encoding="utf-8")

    def no_open(*args, **kwargs):
        raise AssertionError("file was opened although it is over the size limit")

    monkeypatch.setattr(Path, "open", no_open)
    with pytest.raises(DocumentError, match="1,001 bytes, over the limit of 1,000 bytes"):
        load_documents(path, max_bytes=1000)


def test_file_at_max_bytes_is_accepted(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("x" * 1000, encoding="utf-8")
    [doc] = load_documents(path, max_bytes=1000)
    assert len(doc.text) == 1000


@pytest.mark.parametrize("name", ["slides.pptx", "archive.tar.gz", "README"])
def test_unknown_suffix_is_rejected(tmp_path, name):
    path = tmp_path / name
    path.write_text("content", encoding="utf-8")
    with pytest.raises(DocumentError, match="unsupported file type") as exc:
        load_documents(path)
    assert ".txt" in str(exc.value)  # tells the user what would work


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DocumentError, match="no such file") as exc:
        load_documents(path)
    assert str(path) in str(exc.value)


def test_directory_is_rejected(tmp_path):
    path = tmp_path / "folder.txt"
    path.mkdir()
    with pytest.raises(DocumentError, match="directory"):
        load_documents(path)


def test_document_error_is_a_value_error():
    assert issubclass(DocumentError, ValueError)


# ------------------------------------------------------------------------------------------
# PubMedQA JSON
# ------------------------------------------------------------------------------------------

PUBMEDQA = {
    "21645374": {
        "QUESTION": "Do mitochondria play a role in remodelling lace plant leaves?",
        "CONTEXTS": ["Programmed cell death (PCD) is ...", "The following stages were ..."],
        "LABELS": ["BACKGROUND", "RESULTS"],
        "MESHES": ["Apoptosis", "Mitochondria"],
        "YEAR": "2011",
        "reasoning_required_pred": "yes",
        "final_decision": "yes",
        "LONG_ANSWER": "Results depicted mitochondrial dynamics ...",
    },
    "16418930": {
        "QUESTION": "Landolt C and snellen e acuity: differences in strabismus amblyopia?",
        "CONTEXTS": ["Assessment of visual acuity ...", "Patients were tested ...", "Landolt C acuity ..."],
        "LABELS": ["BACKGROUND", "METHODS", "RESULTS"],
        "MESHES": ["Amblyopia"],
        "final_decision": "no",
        "LONG_ANSWER": "Using the charts described ...",
    },
}


def test_pubmedqa_one_document_per_pmid(tmp_path):
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(PUBMEDQA), encoding="utf-8")
    docs = load_documents(path)
    assert [d.doc_id for d in docs] == ["21645374", "16418930"]
    doc = docs[0]
    assert doc.text == "Programmed cell death (PCD) is ...\n\nThe following stages were ..."
    assert [s.title for s in doc.sections] == ["Background", "Results"]
    assert section_text(doc, "Results") == "The following stages were ..."
    assert doc.metadata["question"] == PUBMEDQA["21645374"]["QUESTION"]
    assert doc.metadata["final_decision"] == "yes"
    assert doc.metadata["long_answer"] == "Results depicted mitochondrial dynamics ..."
    assert doc.metadata["meshes"] == ["Apoptosis", "Mitochondria"]
    assert doc.metadata["pmid"] == "21645374"
    assert doc.source == str(path)
    assert docs[1].sections[2] == Section(
        "Results", docs[1].text.index("Landolt C acuity"), len(docs[1].text)
    )
    for d in docs:
        assert_valid_sections(d)


def test_pubmedqa_label_count_mismatch_falls_back_to_numbered_sections(tmp_path):
    data = {"1": {"QUESTION": "q?", "CONTEXTS": ["a", "b"], "LABELS": ["ONLY_ONE"]}}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    [doc] = load_documents(path)
    assert [s.title for s in doc.sections] == ["Context 1", "Context 2"]
    assert doc.metadata["final_decision"] is None  # unlabelled split has no decision


def test_pubmedqa_bad_contexts_names_the_pmid(tmp_path):
    data = {"123": {"QUESTION": "q?", "CONTEXTS": "not a list"}}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DocumentError, match="PMID 123: contexts must be a list of strings"):
        load_documents(path)


def test_malformed_json_reports_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"1": {"QUESTION": "q",\n  "CONTEXTS": [}\n}', encoding="utf-8")
    with pytest.raises(DocumentError, match=r"malformed JSON at line 2 column 16: Expecting value") as exc:
        load_documents(path)
    assert "bad.json" in str(exc.value)


def test_json_with_unknown_layout_is_rejected(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"foo": 1, "bar": [1, 2]}), encoding="utf-8")
    with pytest.raises(DocumentError, match="unrecognised JSON layout"):
        load_documents(path)


def test_json_list_of_text_objects(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(
        json.dumps([{"id": "a", "text": "First."}, {"text": "Second.", "title": "Two"}]), encoding="utf-8"
    )
    docs = load_documents(path)
    assert [(d.doc_id, d.title, d.text) for d in docs] == [("a", "", "First."), ("docs-1", "Two", "Second.")]


# ------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------


def test_jsonl_text_as_paragraphs_or_hugging_face_contexts(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"id": 21645374, "text": {"contexts": ["Ctx one.", "Ctx two."], "labels": ["BACKGROUND", "RESULTS"]}},
        {"text": ["Para one.", "  ", "Para three."]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    first, second = load_documents(path)
    assert first.doc_id == "21645374" and first.text == "Ctx one.\n\nCtx two."
    assert [s.title for s in first.sections] == ["Background", "Results"]
    assert second.text == "Para one.\n\nPara three."
    assert [s.title for s in second.sections] == ["Context 1", "Context 3"]  # numbered as given
    for doc in (first, second):
        assert_valid_sections(doc)


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"id": "p1", "title": "Paper one", "text": "Body one.", "year": 2020}),
        "",
        json.dumps({"doc_id": "p 2", "document": "Body two.\r\nMore."}),
        json.dumps({"text": "Body three."}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(path)
    assert [d.doc_id for d in docs] == ["p1", "p_2", "corpus-4"]
    assert docs[0].title == "Paper one"
    assert docs[0].metadata == {"year": 2020, "format": "jsonl", "line": 1}
    assert docs[1].text == "Body two.\nMore."
    assert docs[2].metadata["line"] == 4  # blank line 2 still counts
    assert all(d.source == str(path) for d in docs)


def test_jsonl_malformed_line_names_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n{"text": "ok too"}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match=r"c\.jsonl: line 2: malformed JSON"):
        load_documents(path)


def test_jsonl_row_without_text_names_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match=r"line 2: row has no 'text' or 'document' field"):
        load_documents(path)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('["a", "list"]\n', encoding="utf-8")
    with pytest.raises(DocumentError, match="line 1: expected a JSON object, got list"):
        load_documents(path)


def test_jsonl_empty_text_is_rejected(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match="line 1: document text is empty"):
        load_documents(path)


def test_jsonl_duplicate_ids_are_rejected(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match="line 2: duplicate document id 'x'.*line 1"):
        load_documents(path)


def test_iter_jsonl_on_error_skips_bad_lines_and_continues(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\nnot json\n\n42\n{"a": 2}\n\xff\xfe\n{"a": 3}\n')
    errors: list[tuple[int, str]] = []
    rows = list(iter_jsonl(path, on_error=lambda n, msg: errors.append((n, msg))))
    assert rows == [(1, {"a": 1}), (5, {"a": 2}), (7, {"a": 3})]
    assert [n for n, _ in errors] == [2, 4, 6]
    assert "malformed JSON" in errors[0][1]
    assert "expected a JSON object" in errors[1][1]
    assert "invalid UTF-8" in errors[2][1]
    assert all(str(path) in msg for _, msg in errors)


def test_iter_jsonl_raises_without_on_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{oops}\n', encoding="utf-8")
    it = iter_jsonl(path)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(DocumentError, match="line 2"):
        next(it)


def test_iter_jsonl_missing_file(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------
# PMC JATS XML
# ------------------------------------------------------------------------------------------

JATS = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Publishing DTD v1.1 20151215//EN"
  "http://jats.nlm.nih.gov/publishing/1.1/JATS-journalpublishing1.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML"
         article-type="research-article">
<?properties open_access?>
<front>
  <journal-meta><journal-title-group><journal-title>Test Journal</journal-title></journal-title-group></journal-meta>
  <article-meta>
    <article-id pub-id-type="pmid">12345678</article-id>
    <article-id pub-id-type="pmc">7654321</article-id>
    <article-id pub-id-type="doi">10.1000/test.1</article-id>
    <title-group><article-title>Effect of <italic>Drug X</italic> on
      blood&nbsp;pressure</article-title></title-group>
    <pub-date pub-type="epub"><year>2019</year></pub-date>
    <abstract>
      <p>Drug X lowered   systolic pressure
         by 10&ndash;12 mmHg.</p>
    </abstract>
    <abstract abstract-type="toc"><p>One-line teaser that should be skipped.</p></abstract>
  </article-meta>
</front>
<body>
  <sec id="s1">
    <title>Introduction</title>
    <p>Hypertension is common [<xref ref-type="bibr" rid="r1">1</xref>].</p>
    <p>We tested <bold>Drug X</bold>.<table-wrap id="t1"><label>Table 1</label>
        <caption><p>Baseline characteristics.</p></caption>
        <table><tr><td>NOISE_CELL</td><td>42</td></tr></table>
      </table-wrap></p>
  </sec>
  <sec id="s2">
    <title>Methods</title>
    <sec id="s2a">
      <title>Participants</title>
      <p>Adults aged <mml:math><mml:mi>x</mml:mi><mml:mo>&ge;</mml:mo><mml:mn>18</mml:mn></mml:math> years.</p>
      <fig id="f1"><label>Figure 1</label><caption><title>Study flow.</title></caption>
        <graphic xlink:href="f1.tif"/></fig>
    </sec>
    <supplementary-material id="s1x"><caption><p>SUPPLEMENT_NOISE</p></caption></supplementary-material>
  </sec>
  <sec id="s3">
    <title>Supporting Information</title>
    <supplementary-material id="s2x"><caption><p>SUPPLEMENT_NOISE</p></caption></supplementary-material>
  </sec>
</body>
<back>
  <ack><p>We thank the participants.</p></ack>
  <ref-list><ref id="r1"><mixed-citation>REFERENCE_NOISE</mixed-citation></ref></ref-list>
</back>
</article>
"""

JATS_EXPECTED_TEXT = (
    "Effect of Drug X on blood pressure\n\n"
    "Abstract\n"
    "Drug X lowered systolic pressure by 10\u201312 mmHg.\n\n"
    "Introduction\n"
    "Hypertension is common [1].\n\n"
    "We tested Drug X.\n\n"
    "Table 1: Baseline characteristics.\n\n"
    "Methods\n"
    "Participants\n"
    "Adults aged x\u226518 years.\n\n"
    "Figure 1: Study flow.\n\n"
    "Acknowledgments\n"
    "We thank the participants."
)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a socket (e.g. to fetch a DTD)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_jats_text_in_reading_order(tmp_path, no_network):
    path = tmp_path / "PMC7654321.nxml"
    path.write_text(JATS, encoding="utf-8")
    [doc] = load_documents(path)
    assert doc.text == JATS_EXPECTED_TEXT
    assert doc.title == "Effect of Drug X on blood pressure"
    assert doc.doc_id == "PMC7654321"
    for noise in ("NOISE_CELL", "SUPPLEMENT_NOISE", "REFERENCE_NOISE", "teaser", "Supporting Information"):
        assert noise not in doc.text


def test_jats_sections_and_metadata(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(JATS, encoding="utf-8")
    [doc] = load_documents(path)
    assert [s.title for s in doc.sections] == ["Abstract", "Introduction", "Methods", "Acknowledgments"]
    assert section_text(doc, "Abstract") == "Abstract\nDrug X lowered systolic pressure by 10\u201312 mmHg."
    assert section_text(doc, "Methods").startswith("Methods\nParticipants\nAdults aged")
    assert section_text(doc, "Methods").endswith("Figure 1: Study flow.")
    assert_valid_sections(doc)
    assert doc.metadata == {
        "format": "jats",
        "article_type": "research-article",
        "pmid": "12345678",
        "pmcid": "PMC7654321",
        "doi": "10.1000/test.1",
        "journal": "Test Journal",
        "year": 2019,
    }


def test_jats_with_default_namespace_and_no_doctype(tmp_path):
    xml = (
        '<article xmlns="http://jats.nlm.nih.gov/ns/archiving/1.0/"><front><article-meta>'
        "<title-group><article-title>Namespaced</article-title></title-group></article-meta></front>"
        "<body><p>Loose paragraph.</p><sec><title>Results</title><p>It worked.</p></sec></body></article>"
    )
    path = tmp_path / "ns.xml"
    path.write_text(xml, encoding="utf-8")
    [doc] = load_documents(path)
    assert doc.text == "Namespaced\n\nLoose paragraph.\n\nResults\nIt worked."
    assert [s.title for s in doc.sections] == ["Body", "Results"]
    assert_valid_sections(doc)


def test_jats_does_not_resolve_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP_SECRET", encoding="utf-8")
    xml = (
        f'<?xml version="1.0"?>\n<!DOCTYPE article [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>\n'
        "<article><body><p>Leak: &xxe; end.</p></body></article>"
    )
    path = tmp_path / "xxe.xml"
    path.write_text(xml, encoding="utf-8")
    try:
        docs = load_documents(path)
    except DocumentError:
        return  # refusing the file is fine too
    assert "TOP_SECRET" not in docs[0].text


def test_xml_with_an_internal_entity_is_refused_before_it_expands(tmp_path):
    """One declared entity used 1,000 times would be read as 1,000 copies; JATS never declares any."""
    body = "<p>" + "&big; " * 1000 + "</p>"
    xml = (
        '<?xml version="1.0"?>\n<!DOCTYPE article [<!ENTITY big "' + "lorem ipsum " * 500 + '">]>\n'
        f"<article><front><article-meta><title-group><article-title>T</article-title></title-group>"
        f"</article-meta></front><body>{body}</body></article>"
    )
    path = tmp_path / "entity.xml"
    path.write_text(xml, encoding="utf-8")
    with pytest.raises(DocumentError, match="ENTITY"):
        load_documents(path)


def test_jats_articleset_wrapper_gives_one_document_per_article(tmp_path):
    art = "<article><front><article-meta><title-group><article-title>T{n}</article-title></title-group></article-meta></front><body><p>P{n}</p></body></article>"
    xml = "<pmc-articleset>" + art.format(n=1) + art.format(n=2) + "</pmc-articleset>"
    path = tmp_path / "set.xml"
    path.write_text(xml, encoding="utf-8")
    docs = load_documents(path)
    assert [(d.doc_id, d.title, d.text) for d in docs] == [
        ("set-1", "T1", "T1\n\nP1"),
        ("set-2", "T2", "T2\n\nP2"),
    ]


def test_xml_that_is_not_jats(tmp_path):
    path = tmp_path / "feed.xml"
    path.write_text("<rss><channel><title>News</title></channel></rss>", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"not a JATS article \(root element is <rss>"):
        load_documents(path)


def test_xml_not_well_formed(tmp_path):
    path = tmp_path / "broken.nxml"
    path.write_text("<article><body><p>unclosed</body></article>", encoding="utf-8")
    with pytest.raises(DocumentError, match="not well-formed XML") as exc:
        load_documents(path)
    assert "broken.nxml" in str(exc.value)


def test_xml_with_unknown_encoding(tmp_path):
    path = tmp_path / "enc.xml"
    path.write_bytes(b'<?xml version="1.0" encoding="no-such-codec"?><article/>')
    with pytest.raises(DocumentError, match="enc.xml: unsupported XML encoding"):
        load_documents(path)


def test_jats_without_text(tmp_path):
    path = tmp_path / "hollow.xml"
    path.write_text("<article><front><article-meta/></front><body/></article>", encoding="utf-8")
    with pytest.raises(DocumentError, match="no abstract or body text"):
        load_documents(path)


def test_jats_deeply_nested_inline_markup_loads(tmp_path):
    # ~50 KB of PMC-style XML with 3,000 nested inline elements used to raise RecursionError.
    depth = 3000
    path = tmp_path / "nested.xml"
    path.write_text(
        "<article><body><sec><title>Results</title><p>Before "
        + "<italic>" * depth
        + "deep text"
        + "</italic>" * depth
        + " after.</p></sec></body></article>",
        encoding="utf-8",
    )
    assert path.stat().st_size > 50_000
    [doc] = load_documents(path)
    assert doc.text == "Results\nBefore deep text after."
    assert [s.title for s in doc.sections] == ["Results"]


def test_jats_deeply_nested_blocks_are_refused_cleanly(tmp_path):
    depth = 3000
    path = tmp_path / "nested_sections.xml"
    path.write_text(
        "<article><body>" + "<sec><p>x</p>" * depth + "</sec>" * depth + "</body></article>",
        encoding="utf-8",
    )
    with pytest.raises(DocumentError, match="nested too deeply") as exc:
        load_documents(path)
    assert "nested_sections.xml" in str(exc.value)


def test_jats_moderately_nested_sections_still_load(tmp_path):
    depth = 20
    path = tmp_path / "sections.xml"
    path.write_text(
        "<article><body>"
        + "".join(f"<sec><title>S{i}</title><p>P{i}.</p>" for i in range(depth))
        + "</sec>" * depth
        + "</body></article>",
        encoding="utf-8",
    )
    [doc] = load_documents(path)
    assert doc.text.endswith("S19\nP19.")


@pytest.mark.skipif(not SHARED_PMC.is_dir(), reason="shared PMC sample files not available")
def test_real_pmc_files_load():
    files = sorted(SHARED_PMC.glob("*/*.nxml")) + sorted(SHARED_PMC.glob("*/*.xml"))
    assert files
    for path in files:
        [doc] = load_documents(path)
        assert doc.title and doc.title != path.stem, path
        assert len(doc.text) > 400, path
        assert doc.sections, path
        assert "<" not in doc.text[:200], path
        assert "documentclass" not in doc.text, path  # TeX alternatives are dropped
        assert_valid_sections(doc)


# ------------------------------------------------------------------------------------------
# PDF
# ------------------------------------------------------------------------------------------


def _make_pdf(path: Path, pages: list[str], title: str | None = None) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4)
    if title:
        c.setTitle(title)
    for text in pages:
        if text:
            c.drawString(72, 760, text)
        c.showPage()
    c.save()


def test_pdf_pages_joined_with_page_sections(tmp_path):
    path = tmp_path / "paper.pdf"
    _make_pdf(path, ["Page one says hello.", "", "Page three says goodbye."], title="A Paper")
    [doc] = load_documents(path)
    assert doc.text == "Page one says hello.\n\nPage three says goodbye."
    assert [s.title for s in doc.sections] == ["Page 1", "Page 3"]  # blank page 2 has no text
    assert section_text(doc, "Page 3") == "Page three says goodbye."
    assert doc.title == "A Paper"
    assert doc.doc_id == "paper"
    assert doc.metadata == {"format": "pdf", "num_pages": 3, "pages_with_text": 2}
    assert_valid_sections(doc)


def test_pdf_without_text_layer(tmp_path):
    from pypdf import PdfWriter

    path = tmp_path / "scan.pdf"
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    with path.open("wb") as fh:
        writer.write(fh)
    with pytest.raises(DocumentError, match=r"has no text layer \(scanned PDF\?\)") as exc:
        load_documents(path)
    assert "scan.pdf" in str(exc.value)


def test_corrupt_pdf(tmp_path):
    path = tmp_path / "corrupt.pdf"
    path.write_bytes(b"%PDF-1.4\n" + random.Random(1).randbytes(2000))
    with pytest.raises(DocumentError, match="corrupt.pdf"):
        load_documents(path)


def test_not_a_pdf(tmp_path):
    path = tmp_path / "fake.pdf"
    path.write_text("just text", encoding="utf-8")
    with pytest.raises(DocumentError, match="not a PDF file"):
        load_documents(path)


def _broken_trailer_pdf() -> bytes:
    """A PDF whose trailer is a number, not a dictionary: pypdf raises AttributeError on it."""
    head = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
    xref = b"xref\n0 2\n0000000000 65535 f \n0000000009 00000 n \ntrailer\n42\n"
    return head + xref + b"startxref\n%d\n%%%%EOF\n" % len(head)


def test_pdf_that_crashes_the_reader_is_a_document_error(tmp_path):
    path = tmp_path / "trailer.pdf"
    path.write_bytes(_broken_trailer_pdf())
    with pytest.raises(DocumentError, match=r"trailer\.pdf: cannot read PDF") as exc:
        load_documents(path)
    assert "Traceback" not in str(exc.value) and "site-packages" not in str(exc.value)


# The PDF reader runs in a child process; these stand-ins for the extractor are imported there by name.
def _extract_raises_index_error(data: bytes) -> dict:
    raise IndexError("list index out of range")


def _extract_sleeps(data: bytes) -> dict:
    import time

    time.sleep(60)
    return {}


def _extract_allocates(data: bytes) -> dict:
    chunks = [bytearray(16 * 1024 * 1024) for _ in range(64)]  # 1 GiB in all, unless stopped
    return {"page_texts": [str(len(chunks))], "num_pages": 1, "title": None, "page_errors": []}


@pytest.fixture
def small_pdf(tmp_path) -> Path:
    path = tmp_path / "small.pdf"
    _make_pdf(path, ["Some text."])
    return path


def test_pdf_reader_exception_becomes_document_error(small_pdf, monkeypatch):
    from qa_pipeline.documents import pdf

    monkeypatch.setattr(pdf, "_extract_pdf_text", _extract_raises_index_error)
    with pytest.raises(DocumentError, match=r"small\.pdf: cannot read PDF \(IndexError: list index") as exc:
        load_documents(small_pdf)
    assert "Traceback" not in str(exc.value)


def test_pdf_reader_timeout_becomes_document_error(small_pdf, monkeypatch):
    import time

    from qa_pipeline.documents import pdf

    monkeypatch.setattr(pdf, "_extract_pdf_text", _extract_sleeps)
    monkeypatch.setattr(pdf, "PDF_TIMEOUT_S", 1.5)
    start = time.monotonic()
    with pytest.raises(DocumentError, match=r"small\.pdf: PDF could not be read within 1\.5 s"):
        load_documents(small_pdf)
    assert time.monotonic() - start < 15


def test_pdf_reader_memory_limit_becomes_document_error(small_pdf, monkeypatch):
    pytest.importorskip("resource")
    from qa_pipeline.documents import pdf

    monkeypatch.setattr(pdf, "_extract_pdf_text", _extract_allocates)
    monkeypatch.setattr(pdf, "PDF_MEMORY_LIMIT_MB", 300)
    with pytest.raises(DocumentError, match=r"small\.pdf: PDF could not be read within 300 MB of memory"):
        load_documents(small_pdf)


def test_pasted_text_drops_a_leading_bom():
    doc = load_text("\ufeffTitle: A book\r\nText.")
    assert doc.text == "Title: A book\nText." and doc.doc_id == load_text("Title: A book\nText.").doc_id


def test_pdf_decompression_bomb_is_refused_with_the_readers_reason(tmp_path):
    # One content stream of real text operators that inflates to 100 MB: pypdf (>= 6) stops at its
    # limit; the refusal says why instead of calling it a scan.
    from bench.hostile import bomb_pdf

    path = bomb_pdf(tmp_path / "bomb.pdf", inflated_mb=100)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(DocumentError, match=r"bomb\.pdf: no text could be read .*LimitReachedError"):
        load_documents(path)
