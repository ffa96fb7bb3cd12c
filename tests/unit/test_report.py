"""The HTML report: sections, embedded PNG figures, escaping, missing data, headless Chromium."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from headless import FLAGS, find_browser
from rlhfkit.eval.report import SECTIONS, render_report
from rlhfkit.ops.selection import bon_kl

SECTION_IDS = [sid for sid, _ in SECTIONS]
FIGURE_SECTIONS = ["curves", "reward-model", "win-rates", "overoptimisation"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Model output that tries to run code: it must arrive in the page as text.
EVIL = '<script>document.body.dataset.pwned = "1"</script><img src=x onerror=alert(1)>'


def synthetic_data() -> dict:
    steps = range(0, 50, 5)
    bon = []
    for n in [1, 2, 4, 8, 16, 32, 64]:
        d = math.sqrt(bon_kl(n))
        bon.append({"n": n, "kl": bon_kl(n), "d": d, "proxy": 0.9 * d, "gold": d * (1 - 0.3 * d)})
    rl = []
    for s in steps:
        kl = 0.02 * s
        d = math.sqrt(kl)
        gold = d * (1 - 0.4 * math.log(d)) if d > 0 else 0.0
        rl.append({"step": s, "kl": kl, "proxy": 1.1 * d, "gold": gold})  # no d: from kl
    return {
        "title": "Pipeline <demo> & co",
        "created": "2025-01-01 12:00",
        "config": {"model": "tiny", "rl": {"kl_coef": 0.05}},
        "stages": {
            "sft": {"seconds": 12.5, "status": "done"},
            "reward_model": {"seconds": 30.0, "status": "done"},
            "rl": {"seconds": 90.25, "status": "done"},
            "judge": {"seconds": 0.0, "status": "skipped"},
        },
        "summary": {
            "gold reward (SFT)": 0.41,
            "gold reward (final)": 0.63,
            "RM reward (final)": 1.7,
            "KL": 0.35,
            "win rate (gold)": 0.58,
            "RM accuracy": 0.74,
            "note": "a <b>bold</b> claim",
        },
        "curves": {
            "rl": [
                {
                    "step": s,
                    "reward": 0.1 * s**0.5,
                    "proxy": 0.1 * s**0.5,
                    "gold": None if s == 10 else 0.05 * s**0.5,
                    "kl": 0.02 * s,
                }
                for s in steps
            ]
        },
        "reward_model": {
            "accuracy": 0.74,
            "pairs": 200,
            "by_category": {"length": 0.9, "keyword": 0.62, "format": 0.7},
        },
        "win_rates": {
            "gold": {"win": 0.58, "tie": 0.12, "loss": 0.30, "n": 100},
            "judge": {"win": 0.55, "tie": 0.05, "loss": 0.40, "n": 100},
        },
        "overoptimisation": {"bon": bon, "rl": rl},
        "samples": [
            {
                "prompt": "Write a haiku.",
                "sft": "An old pond\nfrog",
                "final": "Silent pond —\na frog leaps in",
                "sft_gold": 0.2,
                "final_gold": 0.8,
            },
            {"prompt": EVIL, "sft": EVIL, "final": "ok", "sft_gold": None, "final_gold": 0.5},
        ],
    }


class Page(HTMLParser):
    """Collects sections (heading, images, text), script bodies and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.in_h2 = self.in_script = False
        self.scripts: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "section":
            self.current = a.get("id")
            self.sections[self.current] = {"h2": "", "imgs": [], "text": "", "na": False}
        elif tag == "h2":
            self.in_h2 = True
        elif tag == "script":
            self.in_script = True
            self.scripts.append("")
        elif tag == "img" and self.current:
            self.sections[self.current]["imgs"].append(a.get("src", ""))
        elif tag == "p" and self.current and a.get("class") == "na":
            self.sections[self.current]["na"] = True

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        elif tag == "h2":
            self.in_h2 = False
        elif tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.scripts[-1] += data
        elif self.current:
            sec = self.sections[self.current]
            if self.in_h2:
                sec["h2"] += data
            else:
                sec["text"] += data + " "  # cells are separate words


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix) :], validate=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return render_report(synthetic_data(), tmp_path_factory.mktemp("report") / "out" / "r.html")


def test_every_section_heading_and_figure(report):
    page = parse(report)
    assert list(page.sections) == SECTION_IDS
    for sid, heading in SECTIONS:
        assert page.sections[sid]["h2"] == heading
        assert not page.sections[sid]["na"], sid
    for sid in FIGURE_SECTIONS:
        imgs = page.sections[sid]["imgs"]
        assert imgs, sid
        for src in imgs:
            data = png_bytes(src)
            assert data.startswith(PNG_SIGNATURE) and len(data) > 2000, sid


def test_section_contents(report):
    page = parse(report)
    text = {sid: " ".join(s["text"].split()) for sid, s in page.sections.items()}
    assert "gold reward (final) 0.63" in text["summary"]
    assert "rl done 90.25" in text["summary"] and "judge skipped 0" in text["summary"]
    assert "overall 74.0% 200" in text["reward-model"] and "length 90.0%" in text["reward-model"]
    assert "gold judge 58.0% 12.0% 30.0% 100" in text["win-rates"]
    assert "LLM judge 55.0% 5.0% 40.0% 100" in text["win-rates"]
    # Both curves have a d = 0 point and enough others, so all four Gao fits are tabulated:
    # the noise-free best-of-n gold d (1 - 0.3 d) is recovered exactly, peak 1/(2*0.3).
    assert "best-of-n gold 1 0.3 1.667" in text["overoptimisation"]
    assert "RL gold 1 0.4" in text["overoptimisation"]
    assert text["overoptimisation"].count("proxy") >= 2
    assert "Silent pond — a frog leaps in 0.2 0.8" in text["samples"]
    assert "n/a" in text["samples"]  # sft_gold None


def test_text_is_escaped_and_inert(report):
    raw = report.read_text()
    page = parse(report)
    assert len(page.scripts) == 1 and "naturalWidth" in page.scripts[0]  # only the self-check
    assert "pwned" not in page.scripts[0]
    assert "&lt;script&gt;document.body.dataset.pwned" in raw
    assert "<script>document" not in raw and "<img src=x" not in raw
    assert "Pipeline &lt;demo&gt; &amp; co" in raw and "a &lt;b&gt;bold&lt;/b&gt; claim" in raw
    assert page.tags.count("img") == sum(len(page.sections[s]["imgs"]) for s in FIGURE_SECTIONS)
    assert "b" not in page.tags
    # The sample text survives as text.
    assert EVIL in page.sections["samples"]["text"]


def test_self_contained(report):
    page = parse(report)
    assert page.links and all(link.startswith("data:") for link in page.links)
    assert not re.search(r"https?://", report.read_text())


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"title": "empty", "curves": {"rl": []}, "win_rates": {}, "samples": []},
        {"curves": {"rl": [{"step": 0, "reward": None, "kl": None}]}, "reward_model": {}},
    ],
)
def test_missing_sections_render_a_note(tmp_path, data):
    page = parse(render_report(data, tmp_path / "r.html"))
    assert list(page.sections) == SECTION_IDS
    for sid, heading in SECTIONS:
        sec = page.sections[sid]
        assert sec["h2"] == heading and sec["na"] and not sec["imgs"], sid
        assert "Not available" in sec["text"]


def test_partial_data(tmp_path):
    data = synthetic_data()
    del data["win_rates"]["judge"]
    data["overoptimisation"] = {"bon": data["overoptimisation"]["bon"][:2]}  # too few to fit
    data["reward_model"]["by_category"] = {}
    page = parse(render_report(data, tmp_path / "r.html"))
    text = {sid: " ".join(s["text"].split()) for sid, s in page.sections.items()}
    assert "gold judge" in text["win-rates"] and "LLM judge" not in text["win-rates"]
    assert "alpha" not in text["overoptimisation"]  # no fit table
    for sid in FIGURE_SECTIONS:
        assert len(page.sections[sid]["imgs"]) == 1 and not page.sections[sid]["na"], sid


def test_numpy_scalars_are_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    data = {
        "summary": {"KL": np.float32(0.25), "missing": np.float32("nan"), "steps": np.int64(7)},
        "curves": {"rl": [{"step": np.int64(s), "reward": np.float64(s)} for s in range(3)]},
    }
    page = parse(render_report(data, tmp_path / "r.html"))
    text = " ".join(page.sections["summary"]["text"].split())
    assert "KL 0.25 missing n/a steps 7" in text
    assert len(page.sections["curves"]["imgs"]) == 1


def test_headline_sentences_and_intervals_lead_the_summary(tmp_path):
    ci = {"mean": 0.1, "low": 0.05, "high": 0.15}
    share = {"mean": 0.25, "low": 0.2, "high": 0.3}
    group = {
        "prompts": 84, "sft": ci, "final": ci, "gain": ci, "sentence": f"gain {EVIL}",
        "win_tie_loss": {"win": share, "tie": share, "loss": share, "wins_per_loss": 2.5},
    }  # fmt: skip
    data = {"headline": {"all": group, "unseen": {**group, "gain": {"mean": 0.1}}}}
    page = parse(render_report(data, tmp_path / "r.html"))
    text = " ".join(page.sections["summary"]["text"].split())
    assert text.startswith("All held-out prompts: gain <script>")  # escaped, shown as text
    assert "Unseen task types:" in text
    assert "84 0.100 [0.050, 0.150]" in text and "25.0% [20.0%, 30.0%]" in text
    assert "2.5" in text
    assert "0.100 [0.050, 0.150] n/a" in text  # a gain without its interval: n/a


# ---- headless Chromium -----------------------------------------------------------------------


def run_browser(report: Path, profile: Path, *args: str) -> str:
    cmd = [
        find_browser(),
        "--headless",
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        report.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_chromium_renders_sections_and_images(report, tmp_path):
    dom = run_browser(report, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in dom, sid
    n_images = parse(report).tags.count("img")
    assert n_images >= len(FIGURE_SECTIONS)
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    # The report's self-check ran on load and counted every image as decoded.
    assert f'data-images="{n_images}"' in body.group(0), body.group(0)
    assert f'data-images-total="{n_images}"' in body.group(0), body.group(0)
    assert "pwned" not in body.group(0)  # the sample's script did not run
    assert "&lt;script&gt;document.body.dataset.pwned" in dom


def test_chromium_screenshot(report, tmp_path):
    shot = tmp_path / "shot.png"
    run_browser(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000")
    assert shot.exists(), "chromium wrote no screenshot"
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, len(data)


def test_missing_browser_fails_with_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="make test` installs Debian's chromium"):
        find_browser()


def test_direct_alignment_curves_when_there_is_no_rl_curve(tmp_path):
    dpo = [
        {"step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s, "chosen": -20.0 + 0.1 * s,
         "rejected": -30.0 - 0.5 * s}
        for s in range(1, 6)
    ]  # fmt: skip
    page = parse(render_report({"curves": {"rl": [], "dpo": dpo}}, tmp_path / "r.html"))
    curves = page.sections["curves"]
    assert len(curves["imgs"]) == 1 and not curves["na"]
    assert base64.b64decode(curves["imgs"][0].split(",", 1)[1]).startswith(PNG_SIGNATURE)
    empty = parse(render_report({"curves": {"rl": [], "dpo": []}}, tmp_path / "e.html"))
    assert empty.sections["curves"]["na"]
