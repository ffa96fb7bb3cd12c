"""The app through its HTTP API (TestClient): admin, labelling in every mode, export, bridge."""

from __future__ import annotations

import json

import pytest
from feedback_helpers import Labeller, Site, candidate_rows, field_value, jsonl

from rlhfkit.data.schemas import validate_rows
from rlhfkit.data.sources import Row
from rlhfkit.feedback.bridge import create_task_from_requests, labels_for_task
from rlhfkit.feedback.storage import connect
from rlhfkit.feedback.voting import task_votes


def label_all(labeller: Labeller, answer) -> list[dict]:
    """Answer every item offered; ``answer(i, texts)`` returns the form fields."""
    log = []
    while not labeller.done():
        i, texts = labeller.item()
        assert i not in [entry["i"] for entry in log], "the same item came back"
        fields = answer(i, texts)
        labeller.submit(fields)
        log.append({"i": i, "texts": texts, **fields})
    return log


def expected_pairs(log, name, scale):
    mid = (scale + 1) / 2
    out = set()
    for e in log:
        d = int(e["choice"])
        if d == mid:
            continue
        chosen, rejected = e["texts"] if d < mid else e["texts"][::-1]
        out.add((f"req-{e['i']}", name, chosen, rejected, abs(d - mid), e.get("note", "")))
    return out


def pair_keys(rows):
    return {
        (r["id"], r["labeller"], r["chosen"], r["rejected"], r["margin"], r["note"]) for r in rows
    }


@pytest.mark.parametrize("mode", ["likert5", "likert8"])
def test_pairwise_labelling_and_export(site: Site, mode):
    scale = 5 if mode == "likert5" else 8
    task = site.admin.create_task(candidate_rows(6), mode=mode, overlap=2)
    ann, bob = site.labellers(task, ["ann", "bob"])
    choices = {"ann": [1, 2, scale, scale - 1, 1, 2], "bob": [2, 1, 1, scale, scale, 1]}

    def answer_for(name):
        return lambda i, texts: {"choice": str(choices[name][i]), "note": f"{name} on {i}"}

    logs = {lab.name: label_all(lab, answer_for(lab.name)) for lab in (ann, bob)}
    assert all(len(log) == 6 for log in logs.values())
    rows = site.admin.export(task, format="pairs")
    assert len(rows) == 12
    expected = expected_pairs(logs["ann"], "ann", scale) | expected_pairs(logs["bob"], "bob", scale)
    assert pair_keys(rows) == expected
    # The rows are valid preference rows, extra fields kept as meta.
    examples = validate_rows([Row(r, f"export:{n}") for n, r in enumerate(rows)], "preference")
    assert examples.examples[0].meta["task"] == "demo"
    # The Likert rows keep the canonical value: A = resp-i-0.
    likert = site.admin.export(task, format="likert")
    for row in likert:
        entry = next(e for e in logs[row["labeller"]] if f"req-{e['i']}" == row["id"])
        d = int(entry["choice"])
        canonical = d if entry["texts"][0].endswith("-0") else scale + 1 - d
        assert row["likert"] == canonical and row["scale"] == scale
        assert row["completions"] == [f"resp-{entry['i']}-0", f"resp-{entry['i']}-1"]
    validate_rows([Row(r, "x") for r in likert], "likert")


def test_ties_kept_or_dropped_and_item_aggregate(site: Site):
    task = site.admin.create_task(candidate_rows(3), overlap=3)
    labellers = site.labellers(task, ["a", "b", "c"])
    # Canonical plans per item: a majority for A, a tie by votes (A, B, tie), a majority tie.
    plan = {0: [1, 2, 4], 1: [2, 4, 3], 2: [3, 3, 5]}

    for n, lab in enumerate(labellers):

        def answer(i, texts, n=n):
            canonical = plan[i][n]
            return {"choice": str(canonical if texts[0].endswith("-0") else 6 - canonical)}

        label_all(lab, answer)
    dropped = site.admin.export(task, format="pairs")
    kept = site.admin.export(task, format="pairs", ties="keep")
    assert len(dropped) == 6 and len(kept) == 9
    ties = [r for r in kept if r.get("tie")]
    assert len(ties) == 3 and all(r["margin"] == 0.0 for r in ties)
    assert all(r["chosen"].endswith("-0") for r in ties)
    items = site.admin.export(task, format="pairs", aggregate="item", ties="keep")
    by_id = {r["id"]: r for r in items}
    assert by_id["req-0"]["chosen"] == "resp-0-0" and by_id["req-0"]["margin"] == 1.5
    assert by_id["req-0"]["votes"] == {"a": 2, "b": 1}
    assert by_id["req-1"]["tie"] and by_id["req-2"]["tie"]
    assert [r["id"] for r in site.admin.export(task, format="pairs", aggregate="item")] == ["req-0"]
    no_margin = site.admin.export(task, format="pairs", margin="0")
    assert all("margin" not in r for r in no_margin)
    stats = site.admin.stats(task)
    assert stats["items_complete"] == 3 and stats["labels"] == 9
    # Sides per item: [a, a, b], [a, b, tie], [tie, tie, b] -> P = [1/3, 0, 1/3].
    assert stats["agreement"]["percent_agreement"] == pytest.approx(2 / 9)
    assert stats["agreement"]["fleiss_kappa"] is not None
    assert {s["labeller"]: s["labels"] for s in stats["labellers"]} == {"a": 3, "b": 3, "c": 3}
    detail = site.admin.client.get(f"/admin/tasks/{task}").text
    assert f"<td>{2 / 9:.3f}</td>" in detail  # percent agreement on the task page


def test_rating_mode(site: Site):
    task = site.admin.create_task(candidate_rows(2, k=3), mode="rating", overlap=2)
    labellers = site.labellers(task, ["ann", "bob"])
    truth = {}

    for n, lab in enumerate(labellers):

        def answer(i, texts, n=n):
            # Rate completion j with (j + n + i) % 5 + 1, whatever position it is shown at.
            ratings = {t: (int(t[-1]) + n + i) % 5 + 1 for t in texts}
            truth[(i, n)] = [ratings[f"resp-{i}-{j}"] for j in range(3)]
            fields = {f"rating_{p}": str(ratings[t]) for p, t in enumerate(texts)}
            return fields | {"choice": "submit"}

        label_all(lab, answer)
    rows = site.admin.export(task, format="ratings")
    got = {(r["id"], r["labeller"]): r["ratings"] for r in rows}
    assert got == {(f"req-{i}", ["ann", "bob"][n]): v for (i, n), v in truth.items()}
    validate_rows([Row(r, "x") for r in rows], "ratings")
    mean = site.admin.export(task, format="ratings", aggregate="item")
    first = next(r for r in mean if r["id"] == "req-0")
    assert first["ratings"] == [
        (a + b) / 2 for a, b in zip(truth[(0, 0)], truth[(0, 1)], strict=True)
    ]
    assert site.admin.client.get(f"/admin/tasks/{task}/export?format=pairs").status_code == 400


def test_ranking_mode_and_bad_ranks(site: Site):
    task = site.admin.create_task(candidate_rows(2, k=4), mode="ranking", overlap=1)
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    lab.submit({"rank_0": "1", "rank_1": "1", "rank_2": "2", "rank_3": "3"}, expect=400)
    truth = {}

    def answer(i, texts):
        # Best first: completion 2, 0, 3, 1.
        best = [2, 0, 3, 1]
        truth[i] = best
        ranks = {f"resp-{i}-{j}": place + 1 for place, j in enumerate(best)}
        return {f"rank_{p}": str(ranks[t]) for p, t in enumerate(texts)} | {"choice": "submit"}

    label_all(lab, answer)
    rows = site.admin.export(task, format="rankings")
    assert {r["id"]: r["ranking"] for r in rows} == {f"req-{i}": v for i, v in truth.items()}
    validate_rows([Row(r, "x") for r in rows], "rankings")
    assert site.admin.export(task, format="rankings", aggregate="item")[0]["ranking"] == [
        2,
        0,
        3,
        1,
    ]


def test_skip_progress_notes_and_done(site: Site):
    task = site.admin.create_task(candidate_rows(3, multi_turn=True))
    (lab,) = site.labellers(task, ["ann"])
    page = lab.open()
    assert "labelled 0, skipped 0" in page and "3 of 3 left" in page
    for text in ("be brief", "first turn", "earlier answer", "Prefer <strong>correct</strong>"):
        assert text in page
    skipped, _ = lab.item()
    lab.submit({"choice": "skip"})
    page = lab.open()
    assert "labelled 0, skipped 1" in page
    i, _ = lab.item()
    assert i != skipped
    lab.submit({"choice": "1", "note": "left is right"})
    assert not lab.done()
    i2, _ = lab.item()
    lab.submit({"choice": "5"})
    assert lab.done() and "labelled 2 item(s) and skipped 1" in lab.page
    seen = lab.client.get("/label/votes").text
    assert "left is right" in seen and "skipped" in seen
    rows = site.admin.export(task, format="pairs")
    assert {r["id"] for r in rows} == {f"req-{i}", f"req-{i2}"}
    assert next(r for r in rows if r["id"] == f"req-{i}")["note"] == "left is right"
    assert site.admin.stats(task)["skips"] == 1


def test_retried_post_is_stored_once(site: Site):
    task = site.admin.create_task(candidate_rows(2))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    first = lab.submit({"choice": "2"})
    again = lab.submit({"choice": "2"})  # same nonce, as after a lost response
    assert first.headers["location"] == again.headers["location"] == "/label"
    with connect(site.db) as conn:
        assert len(task_votes(conn, task)) == 1


def test_second_answer_from_another_tab_is_refused_and_shown(site: Site):
    task = site.admin.create_task(candidate_rows(3))
    (lab,) = site.labellers(task, ["ann"])
    tab1, tab2 = lab, Labeller(lab.client, lab.name, lab.link)  # one browser, two tabs
    tab1.open()
    tab2.open()
    first_nonce = field_value(tab1.page, "nonce")
    assert field_value(tab2.page, "nonce") == first_nonce  # the same open item
    tab1.submit({"choice": "1"})
    for choice in ("5", "1"):  # another answer, or the same one: not stored either way
        refused = tab2.submit({"choice": choice}, expect=409)
        assert "already labelled this item" in refused.text and 'id="notice"' in refused.text
        assert "Your first answer is kept; this one was not stored." in refused.text
        # ... and the page goes on with the next item (the one tab 1 now shows).
        assert field_value(refused.text, "nonce") not in ("", first_nonce)
        assert field_value(refused.text, "nonce") == field_value(tab1.open(), "nonce")
    with connect(site.db) as conn:
        (vote,) = task_votes(conn, task)
    assert vote["nonce"] == first_nonce and vote["display_value"] == 1  # the first answer
    # The next item continues normally from the refused page.
    tab2.page = refused.text
    tab2.submit({"choice": "2"})
    with connect(site.db) as conn:
        assert [v["display_value"] for v in task_votes(conn, task)] == [1, 2]


def test_second_answer_after_the_last_item_shows_all_done(site: Site):
    task = site.admin.create_task(candidate_rows(1))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    lab.submit({"choice": "2"})
    refused = lab.submit({"choice": "4"}, expect=409)  # same page, another answer
    assert 'id="done"' in refused.text and "already labelled this item" in refused.text
    with connect(site.db) as conn:
        assert [v["display_value"] for v in task_votes(conn, task)] == [2]


def test_admin_pages_and_upload_errors(site: Site):
    task = site.admin.create_task(candidate_rows(2), name="My <b>task</b>")
    index = site.admin.client.get("/admin").text
    assert "My &lt;b&gt;task&lt;/b&gt;" in index
    detail = site.admin.client.get(f"/admin/tasks/{task}").text
    assert "Invite labellers" in detail and "export?format=pairs" in detail
    bad = site.admin.create_task([{"prompt": "p", "completions": ["a", "b", "c"]}], expect=400)
    assert "candidates.jsonl:1" in bad.text and "compares two completions" in bad.text
    assert site.admin.client.get("/admin/tasks/99").status_code == 404
    assert site.admin.client.get(f"/admin/tasks/{task}/export?format=nope").status_code == 400


def test_bridge_requests_to_labels(tmp_path, site: Site):
    requests = tmp_path / "label_requests.jsonl"
    rows = [
        {
            "id": i,
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "a": f"resp-{i}-0",
            "b": f"resp-{i}-1",
        }
        for i in range(3)
    ]
    requests.write_text(jsonl(rows))
    task, info = create_task_from_requests(site.db, requests, name="pipeline", overlap=2)
    assert info["items"] == 3 and info["admin_path"] == f"/admin/tasks/{task}"
    assert labels_for_task(site.db, task) is None
    a, b = site.labellers(task, ["a", "b"])
    # a prefers A everywhere; b prefers A on item 0, B on 1 (-> tie), skips nothing.
    plans = {"a": {0: 1, 1: 2, 2: 4}, "b": {0: 2, 1: 5, 2: 5}}
    for lab in (a, b):
        done = 0
        while not lab.done():
            i, texts = lab.item()
            canonical = plans[lab.name][i]
            lab.submit({"choice": str(canonical if texts[0].endswith("-0") else 6 - canonical)})
            done += 1
            if lab.name == "b" and done == 2:
                assert labels_for_task(site.db, task) is None  # one item still short
    assert labels_for_task(site.db, task) == [
        {"id": 0, "choice": "a"},
        {"id": 1, "choice": "tie"},
        {"id": 2, "choice": "b"},
    ]
    with pytest.raises(ValueError, match="likert5 or likert8"):
        create_task_from_requests(site.db, requests, name="x", mode="rating")
    json.dumps(info)  # admin-visible info is plain JSON
