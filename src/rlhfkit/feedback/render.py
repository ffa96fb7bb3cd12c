"""HTML rendering: Jinja2 templates with autoescape, and Markdown with raw HTML disabled.

Model outputs, prompts and guidelines are untrusted text. Markdown is rendered by markdown-it
in CommonMark mode with ``html=False``: raw HTML in the text (``<script>``, ``<img onerror>``)
comes out as escaped text, code blocks become ``<pre><code>`` with escaped content, and
markdown-it's link validation drops ``javascript:``/``vbscript:``/``data:`` (non-image) URLs.
Everything else goes through Jinja2's autoescape. The Content-Security-Policy set by the app
(no inline script, scripts only from ``/static``) is a second line of defence.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from rlhfkit.data.messages import parse_completion, parse_prompt
from rlhfkit.extras import import_optional

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


@lru_cache(maxsize=1)
def _markdown() -> Any:
    markdown_it = import_optional("markdown_it", "app", "the labelling app's Markdown rendering")
    return markdown_it.MarkdownIt(
        "commonmark", {"html": False, "linkify": False, "typographer": False}
    )


def markdown(text: str) -> Markup:
    """Render untrusted Markdown to safe HTML (raw HTML is escaped, not passed through)."""
    return Markup(_markdown().render(text))


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The Jinja2 environment of the app's templates (autoescape on for every template)."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["markdown"] = markdown
    return env


def render(template: str, **context: Any) -> str:
    """Render one template of ``templates/``."""
    return environment().get_template(template).render(**context)


def messages_of(prompt: Any, completions: list[Any]) -> tuple[list[dict], list[list[dict]]]:
    """The prompt and completions of an item as normalised message lists (for display)."""
    messages = parse_prompt(prompt, "prompt", "item")
    after = messages[-1]["role"]
    return messages, [parse_completion(c, "completion", "item", after) for c in completions]
