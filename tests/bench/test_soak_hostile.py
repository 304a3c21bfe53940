"""The soak and the hostile-input set, run against a real `hmtqa serve` process with the tiny model.

The README's figures come from the same code with the default model (`python -m bench.soak`,
`python -m bench.hostile`); here they are shorter, but every check is the same.
"""

from __future__ import annotations

import shutil

from bench import hostile, soak


def test_soak_eight_sessions_lose_nothing(tmp_path):
    res = soak.run(sessions=8, duration_s=12, tiny=True, root=tmp_path)
    print(soak.report(res))  # shown by pytest when an assertion below fails
    assert res["errors"] == [] and res["lost"] == []
    assert all(n >= 2 for n in res["asks_per_session"])  # every session got answers, not just the first
    assert res["documents"] == sum(n // 2 for n in res["asks_per_session"])  # two questions per document
    assert res["tracebacks_in_server_log"] == 0
    assert res["session_folders_while_serving"] >= 8 and res["session_folders_after_shutdown"] == 0
    assert res["ask_latency_s"]["p95"] >= res["ask_latency_s"]["p50"] > 0
    assert soak.passed(res)


def test_hostile_inputs_get_clear_messages_in_every_face(tmp_path):
    res = hostile.run(tiny=True, limit_s=120, root=tmp_path, page=shutil.which("chromium") is not None)
    print(hostile.report(res))  # shown by pytest when an assertion below fails
    by_case = {r["case"].split(" (")[0]: r for r in res["cases"]}
    assert len(by_case) == 6
    for row in res["cases"]:
        for face in ("api", "page", "cli"):
            outcome = row[face]
            if outcome is not None:
                assert outcome["clear"], (row["case"], face, outcome["message"])
                assert outcome["in_time"], (row["case"], face, outcome["s"])
        assert row["next_request_s"] < 60
    for face in ("api", "page", "cli"):  # the page shows messages as HTML: nothing in them may vanish
        if by_case["entity expansion"][face] is not None:
            assert "ENTITY declaration" in by_case["entity expansion"][face]["message"]
    assert "nested too deeply" in by_case["block nesting 3,000 deep"]["api"]["message"]
    assert "ingested" in by_case["inline nesting 3,000 deep"]["api"]["message"]
    assert "LimitReachedError" in by_case["PDF decompression bomb"]["api"]["message"]
    assert by_case["200 files in one upload"]["cli"] is None  # the CLI has no files-per-request cap
    assert res["tracebacks_in_server_log"] == 0
    assert hostile.passed(res)
