"""Prometheus text metrics: live sessions, storage write-behind figures."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from sessions_app import storage, terminals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render() -> str:
    """Return the current figures in the Prometheus text format."""
    lines = [
        "# HELP termsys_live_terminals Terminals with a running process in this server process.",
        "# TYPE termsys_live_terminals gauge",
        f"termsys_live_terminals {len(terminals.all_terminals())}",
        "# HELP termsys_live_scrollback_bytes Output live terminals hold in memory for replay.",
        "# TYPE termsys_live_scrollback_bytes gauge",
        f"termsys_live_scrollback_bytes {terminals.tail_bytes()}",
        "# HELP termsys_storage_pending Writes accepted but not yet in the database, by mode.",
        "# TYPE termsys_storage_pending gauge",
    ]
    figures = storage.pending()
    for mode, values in figures.items():
        lines.append(f'termsys_storage_pending{{mode="{mode}"}} {values.get("count", 0)}')
    lines += [
        "# HELP termsys_storage_oldest_pending_seconds Age of the oldest pending write, by mode.",
        "# TYPE termsys_storage_oldest_pending_seconds gauge",
    ]
    for mode, values in figures.items():
        age = values.get("oldest_age", 0.0)
        lines.append(f'termsys_storage_oldest_pending_seconds{{mode="{mode}"}} {age}')
    if "HYBRID" in figures:
        hybrid = figures["HYBRID"]
        lines += [
            "# HELP termsys_journal_bytes Bytes in the HYBRID journal on disk.",
            "# TYPE termsys_journal_bytes gauge",
            f"termsys_journal_bytes {hybrid.get('journal_bytes', 0)}",
            "# HELP termsys_storage_circuit_open 1 while the sync engine cannot reach the database",
            "# TYPE termsys_storage_circuit_open gauge",
            f"termsys_storage_circuit_open {1 if hybrid.get('circuit') == 'open' else 0}",
        ]
    return "\n".join(lines) + "\n"


def metrics(request: HttpRequest) -> HttpResponse:
    """Serve the figures (no login: for a Prometheus scraper; counts only, no user data)."""
    return HttpResponse(render(), content_type=CONTENT_TYPE)
