"""Hostile input through the three faces: the web page (headless chromium), the HTTP API and the CLI.

Cases: XML with an internal entity, block nesting 3,000 deep, deep inline nesting (must load), a PDF
decompression bomb, a 50 MB paste (a 50 MiB text file for the CLI) and 200 files in one upload. Each
must be answered with a clear message within ``--time-limit`` seconds, and the server must answer the
next request. The CLI has no files-per-request cap (it reads the user's own files on the user's own
machine), so the 200-file case is run through the page and the API only.

    python -m bench.hostile          # the default model (figures for the README)
    python -m bench.hostile --tiny   # smoke run with the tiny random model
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench.loopback import REPO, model_args, serve

PASTE_MB = 50
BOMB_MB = 512  # what the bomb's one content stream inflates to


# ------------------------------------------------------------------------------------ the inputs
def entity_xml(path: Path) -> Path:
    """A PMC-style article whose body expands one internal entity many times (~150 KB on disk)."""
    big = "lorem ipsum dolor sit amet " * 200
    body = "<p>" + "&big;" * 25_000 + "</p>"
    path.write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE article [<!ENTITY big "{big}">]>\n'
        f"<article><front><article-meta><title-group><article-title>Entity</article-title></title-group>"
        f"</article-meta></front><body><sec><title>Results</title>{body}</sec></body></article>\n",
        encoding="utf-8",
    )
    return path


def nested_blocks_xml(path: Path, depth: int = 3000) -> Path:
    """Sections nested ``depth`` deep: no real article does this; it must be refused, not crash."""
    path.write_text(
        '<?xml version="1.0"?>\n<article><body>' + "<sec>" * depth + "<p>Deep.</p>" + "</sec>" * depth
        + "</body></article>\n",
        encoding="utf-8",
    )
    return path


def nested_inline_xml(path: Path, depth: int = 3000) -> Path:
    """3,000 nested inline elements in ~50 KB (a RecursionError before): must load."""
    inner = "<italic>" * depth + "deep text" + "</italic>" * depth
    path.write_text(
        '<?xml version="1.0"?>\n<article><body><sec><title>Results</title><p>The patient took aspirin. '
        f"{inner}</p></sec></body></article>\n",
        encoding="utf-8",
    )
    return path


def bomb_pdf(path: Path, inflated_mb: int = BOMB_MB) -> Path:
    """A one-page PDF whose content stream (real text operators) inflates to ``inflated_mb`` MB."""
    line = b"BT /F1 12 Tf 72 712 Td (Hello world) Tj ET\n"
    chunk = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(chunk) for _ in range(inflated_mb)) + comp.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def paste_text(mb: int = PASTE_MB) -> str:
    return ("The patient takes aspirin 75 mg daily. " * (mb * 1024 * 1024 // 39 + 1))[: mb * 1024 * 1024]


def many_files(folder: Path, n: int = 200) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"note-{i:03d}.txt"
        p.write_text(f"Note {i}: the patient takes aspirin {i} mg daily.", encoding="utf-8")
        paths.append(p)
    return paths


@dataclass
class Case:
    name: str
    expect: str  # regex the answer must match (case-insensitive): a clear message, or "ingested"
    files: list[Path] | None = None  # uploaded (page, API) and passed to the CLI
    text: str | None = None  # pasted (page, API)
    cli_files: list[Path] | None = None  # when the CLI gets other files than the page and the API


def make_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    big_txt = folder / "paste-50mb.txt"
    big_txt.write_text(paste_text(), encoding="utf-8")
    return [
        Case("entity expansion (XML <!ENTITY>)", r"ENTITY declaration", [entity_xml(folder / "entity.xml")]),
        Case("block nesting 3,000 deep (XML)", r"nested too deeply", [nested_blocks_xml(folder / "sections.xml")]),
        Case("inline nesting 3,000 deep (XML, loads)", r"ingested", [nested_inline_xml(folder / "inline.xml")]),
        Case(f"PDF decompression bomb ({BOMB_MB} MB inflated)", r"no text could be read|LimitReached|too long|memory",
             [bomb_pdf(folder / "bomb.pdf")]),
        Case(f"{PASTE_MB} MB paste (CLI: a 50 MiB .txt file)", r"limit|tokens long", text=paste_text(),
             cli_files=[big_txt]),
        Case("200 files in one upload", r"up to \d+ per ingest", files=many_files(folder / "many")),
    ]


# ------------------------------------------------------------------------------------ the faces
def _outcome(case: Case, message: str, seconds: float, limit_s: float) -> dict:
    clear = bool(re.search(case.expect, message, re.I))
    return {"message": message[:300], "s": round(seconds, 2), "clear": clear, "in_time": seconds <= limit_s}


def via_api(url: str, case: Case, limit_s: float) -> dict:
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False)
    files = [handle_file(str(p)) for p in case.files or []]
    start = time.perf_counter()
    try:
        status, _, _ = c.predict(files=files, text=case.text or "", save_to_shared=False, api_name="/ingest")
        message = str(status)
    except Exception as err:  # noqa: BLE001 - the refusal's message is what is measured
        message = f"{type(err).__name__}: {err}"
    return _outcome(case, message, time.perf_counter() - start, limit_s)


def via_cli(case: Case, store: Path, tiny: bool, limit_s: float) -> dict | None:
    files = case.cli_files if case.cli_files is not None else case.files
    if not files or len(files) > 1 and case.cli_files is None:
        return None  # the CLI reads the user's own files: no files-per-request cap to test
    cmd = [sys.executable, "-m", "hmtqa", "ingest", "--store", str(store), *model_args(tiny), *map(str, files)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s * 20)
    seconds = time.perf_counter() - start
    # Success is reported on stdout, a refusal on stderr (after any progress bars).
    lines = [ln for ln in (proc.stdout if proc.returncode == 0 else proc.stderr).splitlines() if ln.strip()]
    message = (lines[-1] if lines else "") + f" (exit {proc.returncode})"
    return _outcome(case, message, seconds, limit_s)


def via_page(url: str, case: Case, limit_s: float, browser) -> dict:
    page = browser.new_page()
    page.set_default_timeout(limit_s * 1000 * 3)
    try:
        page.goto(url)
        page.get_by_text("ready", exact=False).first.wait_for()
        start = time.perf_counter()
        if case.files:
            page.set_input_files("#files input[type=file]", [str(p) for p in case.files])
        clipped = ""
        if case.text:
            clipped = _paste(page, case.text)
        if case.files:
            # Gradio refuses an oversize upload itself; otherwise the download link shows it arrived.
            page.locator("#files a.download-link, .toast-body").first.wait_for()
        page.click("#ingest-btn")
        shown = page.locator(".toast-body, #ingest-status:has-text('ingested')").first
        shown.wait_for()
        text = shown.inner_text().replace("\n", " ").strip(" ×")  # the toast's close button
        message = clipped + text.removeprefix("Error ")
        return _outcome(case, message, time.perf_counter() - start, limit_s)
    finally:
        page.close()


def _paste(page, text: str) -> str:
    """Paste ``text`` into the paste box as a browser does: clipped to the box's ``maxlength``. The
    text is rebuilt inside the page from its first line, so 50 MB need not cross the DevTools socket."""
    unit = text[: text.index(".") + 2]
    page.locator("#paste textarea").wait_for()  # evaluate() does not wait for the box as fill() would
    shown = page.evaluate(
        """([unit, n]) => {
            const box = document.querySelector('#paste textarea');
            let text = unit.repeat(Math.ceil(n / unit.length)).slice(0, n);
            if (box.maxLength > 0) text = text.slice(0, box.maxLength);
            const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
            setter.call(box, text);
            box.dispatchEvent(new Event('input', {bubbles: true}));
            return [box.value.length, box.maxLength];
        }""",
        [unit, len(text)],
    )
    return f"(the box kept {shown[0]:,} of {len(text):,} characters: its maxlength) "


def still_serving(url: str) -> float:
    """Seconds for a fresh session to ingest a short note and answer a question about it."""
    from gradio_client import Client

    c = Client(url, verbose=False)
    start = time.perf_counter()
    _, doc_id, _ = c.predict(files=[], text="The patient takes aspirin 75 mg daily. " * 5, save_to_shared=False,
                             api_name="/ingest")
    c.predict(doc_id=doc_id, question="Which drug?", mode="hmt", options="", api_name="/ask")
    return time.perf_counter() - start


def run(*, tiny: bool, limit_s: float, root: Path, page: bool = True) -> dict:
    cases = make_cases(root / "inputs")
    rows = []
    browser_ctx = None
    chromium = shutil.which("chromium")
    with serve(root / "server", tiny=tiny) as server:
        browser = None
        if page and chromium:
            from playwright.sync_api import sync_playwright

            browser_ctx = sync_playwright().start()
            browser = browser_ctx.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for case in cases:
                row = {"case": case.name}
                row["api"] = via_api(server.url, case, limit_s)
                row["page"] = via_page(server.url, case, limit_s, browser) if browser else None
                row["next_request_s"] = round(still_serving(server.url), 2)
                row["cli"] = via_cli(case, root / "cli-store", tiny, limit_s)
                rows.append(row)
        finally:
            if browser is not None:
                browser.close()
                browser_ctx.stop()
        tracebacks = server.log_text().count("Traceback")
    return {"model": "tiny-random" if tiny else "default", "time_limit_s": limit_s, "cases": rows,
            "tracebacks_in_server_log": tracebacks}


def passed(res: dict) -> bool:
    faces = [r[f] for r in res["cases"] for f in ("api", "page", "cli") if r.get(f)]
    return all(f["clear"] and f["in_time"] for f in faces) and res["tracebacks_in_server_log"] == 0


def report(res: dict) -> str:
    def cell(o: dict | None) -> str:
        if o is None:
            return "n/a"
        return f"{o['s']:.1f} s{'' if o['clear'] else ' UNCLEAR'}{'' if o['in_time'] else ' LATE'}"

    lines = [f"hostile input, model {res['model']}, time limit {res['time_limit_s']:.0f} s per answer",
             f"{'case':48s} {'page':>12s} {'API':>12s} {'CLI':>12s} {'next request':>13s}"]
    for r in res["cases"]:
        lines.append(f"{r['case']:48s} {cell(r['page']):>12s} {cell(r['api']):>12s} {cell(r['cli']):>12s} "
                     f"{r['next_request_s']:>11.1f} s")
    for r in res["cases"]:
        for face in ("page", "api", "cli"):
            if r.get(face):
                lines.append(f"  {r['case']} [{face}]: {r[face]['message'][:160]}")
    lines.append(f"tracebacks in the server log: {res['tracebacks_in_server_log']}")
    lines.append("PASS" if passed(res) else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead of the default one")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds each answer may take")
    p.add_argument("--no-page", action="store_true", help="skip the browser (API and CLI only)")
    ns = p.parse_args(argv)
    info = common.machine_info(device="cpu", dtype="bfloat16", threads=0)
    with tempfile.TemporaryDirectory(prefix="hmtqa-hostile-") as tmp:
        res = run(tiny=ns.tiny, limit_s=ns.time_limit, root=Path(tmp), page=not ns.no_page)
    res["machine"] = common.finish_machine_info(info)
    print(report(res))
    if not ns.tiny:
        common.write_results("hostile", res, ns.out, quick=ns.quick)
    return 0 if passed(res) else 1


if __name__ == "__main__":
    sys.exit(main())
