"""rlhfkit.feedback: human preference collection (web app, storage, export, agreement).

``rlhfkit label serve`` runs a small FastAPI app with server-rendered pages. An admin (admin
token) creates a task by uploading candidates (a prompt or conversation with K >= 2
completions), picks the mode (pairwise Likert 5-point with tie or 8-point without, rating 1-5,
ranking of K), the labels wanted per item (overlap) and Markdown guidelines, and invites
labellers, each with a personal token link. Labellers see one item at a time in a random
left/right order (recorded), answer by mouse or keyboard, may add a note or skip, and never see
an item twice. ``rlhfkit label export`` writes preference pairs, Likert rows, ratings or
rankings for the reward-model and DPO recipes, with agreement and per-labeller statistics.

Modules:

===============  ==============================================================================
module           role
===============  ==============================================================================
``storage``      SQLite schema (versioned, migrations), WAL, ``BEGIN IMMEDIATE`` writes, tasks,
                 items, labellers, sessions
``voting``       item assignment, presentations (nonce + order), answers -> canonical values
``importer``     candidate JSONL -> items, validated with the dataset message rules
``auth``         tokens (stored as SHA-256), HMAC CSRF tokens
``render``       Jinja2 (autoescape) and Markdown (markdown-it, raw HTML off)
``middleware``   body size limit, token-bucket rate limit, security headers, redacted access log
``web``          request helpers: connection, viewer, CSRF check, pages
``app``          ``create_app`` and the login / labelling routes
``admin``        admin routes: tasks, upload, invitations, statistics, export
``agreement``    percent agreement, Cohen's and Fleiss' kappa, per-labeller statistics
``export``       rows in the ``preference`` / ``likert`` / ``ratings`` / ``rankings`` schemas
``bridge``       the pipeline's human mode: requests -> task, task -> ``{"id", "choice"}``
``serve``        command configs and entry points (serve, export, task)
===============  ==============================================================================

Security: tokens and session ids are stored only as hashes; admin routes refuse labeller
sessions; every form carries an HMAC CSRF token bound to the session; all SQL is
parameterised; model output is rendered as escaped Markdown under a Content-Security-Policy
without inline scripts; request bodies are size-limited; clients are rate-limited; the access
log redacts token links.

The web modules import FastAPI, which comes with the ``app`` extra (``pip install
'rlhfkit[app]'``); import them directly (this package's ``__init__`` imports nothing). Storage,
import, export, agreement and the pipeline's bridge need no extra.
"""
