"""The sweep's summary: per-trial counts and attrition funnel as JSON, text and HTML with SVG."""

from __future__ import annotations

import html
from typing import Any

from cds.criteria import TrialSet
from cds.criteria.model import is_enrolling, registry_phrase
from cds.sweep.core import STATUSES, Tally

JSONDict = dict[str, Any]

_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "unknown": "#f9a825", "manual": "#1565c0"}
_KINDS = ("pass", "fail", "unknown", "manual")


def build_summary(tally: Tally, trials: TrialSet, meta: JSONDict) -> JSONDict:
    """summary.json: the run's facts (as-of, source, completeness) and, per trial, status
    counts, the funnel in protocol order and each criterion's totals over all patients."""
    per_trial: JSONDict = {}
    for trial in trials:
        funnel = []
        for criterion, counts, totals in zip(
            trial.criteria, tally.funnel[trial.id], tally.totals[trial.id], strict=True
        ):
            entering, n_pass, n_fail, n_unknown, n_manual = counts
            funnel.append(
                {
                    "id": criterion.id,
                    "kind": criterion.kind,
                    "label": criterion.label,
                    "entering": entering,
                    "pass": n_pass,
                    "fail": n_fail,
                    "unknown": n_unknown,
                    "manual": n_manual,
                    "remaining": entering - n_fail,
                    "all_patients": dict(zip(_KINDS, totals, strict=True)),
                }
            )
        per_trial[trial.id] = {
            "title": trial.title,
            "version": trial.version,
            "registry_status": trial.registry_status,
            "enrolling": is_enrolling(trial.registry_status),
            "status": dict(tally.status[trial.id]),
            "funnel": funnel,
        }
    return {**meta, "patients": tally.patients, "errors": tally.errors, "trials": per_trial}


def summary_text(summary: JSONDict) -> str:
    """The terminal summary: counts per trial and the funnel, one line per criterion."""
    lines = [
        f"sweep as of {summary['as_of']}: {summary['patients']:,} patients evaluated, "
        f"{summary['errors']:,} could not be"
        + ("" if summary.get("complete") else " (INCOMPLETE: resume with --resume)")
    ]
    for tid, trial in summary["trials"].items():
        counts = ", ".join(f"{k} {v:,}" for k, v in trial["status"].items())
        registry = registry_phrase(trial["registry_status"])
        lines.append(f"\n{tid} v{trial['version']} [{registry}]: {counts}")
        lines.append(
            f"  {'criterion':<44} {'in':>7} {'pass':>7} {'fail':>7} {'unknown':>7} "
            f"{'manual':>7} {'left':>7}"
        )
        for c in trial["funnel"]:
            lines.append(
                f"  {c['label'][:44]:<44} {c['entering']:>7,} {c['pass']:>7,} {c['fail']:>7,} "
                f"{c['unknown']:>7,} {c['manual']:>7,} {c['remaining']:>7,}"
            )
    return "\n".join(lines) + "\n"


def _funnel_svg(trial: JSONDict) -> str:
    """A horizontal stacked bar per criterion (pass/fail/unknown/manual among the patients
    still in), with a line for how many remain; plain SVG, no script, no external asset."""
    rows = trial["funnel"]
    label_w, bar_w, row_h, top = 300, 520, 22, 28
    height = top + row_h * len(rows) + 10
    biggest = max([r["entering"] for r in rows] + [1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" '
        f'height="{height}" role="img" aria-label="attrition funnel" '
        'font-family="sans-serif" font-size="12">'
    ]
    x = label_w
    for kind in _KINDS:
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{_COLOURS[kind]}"/>')
        parts.append(f'<text x="{x + 16}" y="16">{kind}</text>')
        x += 90
    for i, r in enumerate(rows):
        y = top + i * row_h
        title = html.escape(f"{r['id']}: {r['label']}")
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">'
            f"<title>{title}</title>{html.escape(r['label'][:46])}</text>"
        )
        left = float(label_w)
        for kind in _KINDS:
            w = bar_w * r[kind] / biggest
            if w > 0:
                parts.append(
                    f'<rect x="{left:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                    f'fill="{_COLOURS[kind]}"><title>{kind}: {r[kind]:,}</title></rect>'
                )
            left += w
        parts.append(f'<text x="{left + 4:.1f}" y="{y + 14}">{r["remaining"]:,} left</text>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(summary: JSONDict) -> str:
    """A self-contained page (inline CSS and SVG, no script, no external asset)."""
    esc = html.escape
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Trial screening sweep as of {esc(str(summary['as_of']))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".warn{color:#b71c1c}</style></head><body>",
        f"<h1>Trial screening sweep, as of {esc(str(summary['as_of']))}</h1>",
        f"<p>Source: {esc(str(summary.get('source', {}).get('description', '')))}. "
        f"{summary['patients']:,} patients evaluated; {summary['errors']:,} could not be "
        "evaluated (see errors.ndjson).</p>",
    ]
    if not summary.get("complete"):
        body.append(
            '<p class="warn">This sweep is incomplete: it was interrupted; run it again '
            "with --resume to finish.</p>"
        )
    body.append(
        "<p>The funnel follows each trial's criteria in protocol order: at each "
        "criterion, the patients no earlier criterion ruled out, split into pass, fail, "
        "unknown (data missing or stale: not a fail) and manual (a person must check). "
        "Only a fail removes a patient.</p>"
    )
    for tid, trial in summary["trials"].items():
        body.append(f"<h2>{esc(tid)}: {esc(trial['title'])}</h2>")
        body.append(
            f"<p>Definition v{esc(trial['version'])}; registry status "
            f"{esc(registry_phrase(trial['registry_status']))}.</p>"
        )
        body.append(
            "<table><tr>"
            + "".join(f"<th>{esc(s.value)}</th>" for s in STATUSES)
            + "</tr><tr>"
            + "".join(f"<td>{trial['status'].get(s.value, 0):,}</td>" for s in STATUSES)
            + "</tr></table>"
        )
        body.append(_funnel_svg(trial))
        body.append(
            "<table><tr><th>criterion</th><th>in</th><th>pass</th><th>fail</th>"
            "<th>unknown</th><th>manual</th><th>left</th></tr>"
        )
        for c in trial["funnel"]:
            body.append(
                f'<tr><td title="{esc(c["id"])}">{esc(c["label"])}</td><td>{c["entering"]:,}'
                f"</td><td>{c['pass']:,}</td><td>{c['fail']:,}</td><td>{c['unknown']:,}</td>"
                f"<td>{c['manual']:,}</td><td>{c['remaining']:,}</td></tr>"
            )
        body.append("</table>")
    body.append("</body></html>\n")
    return "\n".join(body)
