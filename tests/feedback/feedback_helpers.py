"""Helpers of the labelling-app tests: candidate rows, an admin and labellers on a TestClient."""

from __future__ import annotations

import html
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import hash_token

ADMIN_TOKEN = "test-admin-token-0123456789"


def candidate_rows(n: int, k: int = 2, *, multi_turn: bool = False) -> list[dict[str, Any]]:
    """n rows; completion j of row i is ``resp-i-j`` (distinct, easy to find on a page)."""
    rows = []
    for i in range(n):
        prompt: Any = f"question {i}"
        if multi_turn:
            prompt = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"first turn {i}"},
                {"role": "assistant", "content": f"earlier answer {i}"},
                {"role": "user", "content": f"question {i}"},
            ]
        rows.append(
            {
                "id": f"req-{i}",
                "prompt": prompt,
                "completions": [f"resp-{i}-{j}" for j in range(k)],
                "task": "demo",
            }
        )
    return rows


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def field_value(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no field {name} on the page:\n{page[:2000]}"
    return html.unescape(match.group(1))


def shown_texts(page: str, k: int) -> list[str]:
    """The ``resp-i-j`` text shown at each display position."""
    out = []
    for pos in range(k):
        start = page.index(f'id="completion-{pos}"')
        end = page.find('id="completion-', start + 1)
        chunk = page[start : end if end != -1 else len(page)]
        found = re.findall(r"resp-\d+-\d+", chunk)
        assert found, chunk
        out.append(found[0])
    return out


@dataclass
class Labeller:
    client: TestClient
    name: str
    link: str
    page: str = ""
    votes: list[dict[str, Any]] = field(default_factory=list)

    def login(self) -> None:
        path = self.link.split("testserver", 1)[-1]
        response = self.client.get(path, follow_redirects=False)
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/label"

    def open(self) -> str:
        response = self.client.get("/label")
        assert response.status_code == 200, response.text
        self.page = response.text
        return self.page

    def done(self) -> bool:
        return 'id="done"' in self.open()

    def item(self) -> tuple[int, list[str]]:
        """(item index i, texts shown left to right) of the open page."""
        k = int(re.search(r'data-k="(\d+)"', self.page).group(1))
        texts = shown_texts(self.page, k)
        return int(texts[0].split("-")[1]), texts

    def submit(self, fields: dict[str, str], expect: int = 303) -> Any:
        """Post the open page's form (its hidden fields, as a browser does) with ``fields``."""
        data = {"csrf": field_value(self.page, "csrf"), "nonce": field_value(self.page, "nonce")}
        if 'name="form_id"' in self.page:
            data["form_id"] = field_value(self.page, "form_id")
        data.update(fields)
        response = self.client.post("/label/vote", data=data, follow_redirects=False)
        assert response.status_code == expect, response.text
        return response


@dataclass
class Admin:
    client: TestClient

    def login(self) -> None:
        page = self.client.get("/admin/login").text
        data = {"csrf": field_value(page, "csrf"), "token": ADMIN_TOKEN}
        response = self.client.post("/admin/login", data=data, follow_redirects=False)
        assert response.status_code == 303, response.text

    def csrf(self) -> str:
        return field_value(self.client.get("/admin/tasks/new").text, "csrf")

    def create_task(
        self,
        rows: list[dict[str, Any]],
        *,
        mode: str = "likert5",
        overlap: int = 1,
        name: str = "task",
        guidelines: str = "Prefer **correct** answers.",
        expect: int = 303,
    ) -> Any:
        data = {
            "csrf": self.csrf(),
            "name": name,
            "mode": mode,
            "overlap": str(overlap),
            "guidelines": guidelines,
        }
        files = {"file": ("candidates.jsonl", jsonl(rows).encode(), "application/json")}
        response = self.client.post("/admin/tasks", data=data, files=files, follow_redirects=False)
        assert response.status_code == expect, response.text
        if expect == 303:
            return int(response.headers["location"].rsplit("/", 1)[1])
        return response

    def invite(self, task_id: int, names: list[str]) -> list[str]:
        data = {"csrf": self.csrf(), "names": "\n".join(names)}
        response = self.client.post(f"/admin/tasks/{task_id}/invite", data=data)
        assert response.status_code == 200, response.text
        links = re.findall(r"http://testserver/l/[A-Za-z0-9_-]+", response.text)
        assert len(links) == len(names)
        return links

    def export(self, task_id: int, **params: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/admin/tasks/{task_id}/export", params=params)
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines()]

    def stats(self, task_id: int) -> dict[str, Any]:
        response = self.client.get(f"/admin/tasks/{task_id}/stats")
        assert response.status_code == 200, response.text
        return response.json()


@dataclass
class Site:
    app: Any
    db: Path
    admin: Admin

    def labellers(self, task_id: int, names: list[str]) -> list[Labeller]:
        out = []
        for name, link in zip(names, self.admin.invite(task_id, names), strict=True):
            labeller = Labeller(TestClient(self.app), name, link)
            labeller.login()
            out.append(labeller)
        return out


def make_site(tmp_path: Path, **kwargs: Any) -> Site:
    db = tmp_path / "labels.sqlite"
    kwargs.setdefault("rate_per_second", 0)
    app = create_app(db, admin_token_hash=hash_token(ADMIN_TOKEN), rng=random.Random(0), **kwargs)
    admin = Admin(TestClient(app))
    admin.login()
    return Site(app, db, admin)
