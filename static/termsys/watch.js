// The staff's read-only view of one terminal (linked from the admin).

import { TerminalView } from "./terminal-view.js";

const session = JSON.parse(document.getElementById("termsys-session").textContent);
const status = document.getElementById("connection-status");

function render(view) {
  status.dataset.state = view.status;
  status.querySelector(".status-text").textContent = view.statusText();
}

const known = Number.isInteger(session.cols) && Number.isInteger(session.rows);
const view = new TerminalView({
  session,
  connectionUrl: `/ws/terminals/${encodeURIComponent(session.id)}/?readonly=1`,
  container: document.getElementById("terminal-area"),
  onChange: render,
  // The owner's size, whatever this window's: full-screen programs and lines drawn for it
  // show as the owner sees them (the pane scrolls when they do not fit).
  cols: known ? session.cols : undefined,
  rows: known ? session.rows : undefined,
  fixedSize: known,
  onLeave: () => document.querySelector(".topbar a")?.focus(),
  readOnly: true,
});
view.show();
window.addEventListener("resize", () => view.fit());
window.addEventListener("online", () => view.retryNow());
window.termsys = { activeTerminal: () => view.term, activeSessionId: () => view.session.id };
