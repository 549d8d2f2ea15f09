// The search panel: ask /api/sessions/search, list the hits, open a hit's project and tab.

import { api } from "./api.js";
import { tabLabel } from "./render.js";

const PAGE_SIZE = 20;

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

function hitItem(hit, open) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "search-hit";
  const meta = document.createElement("span");
  meta.className = "search-hit-meta";
  const tab = tabLabel(hit.session) || hit.session.id; // as its tab shows it
  meta.textContent = `${hit.project.name} › ${tab} · ${when(hit.time)}`;
  const snippet = document.createElement("span");
  snippet.className = "search-hit-snippet";
  // The server HTML-escapes the text and adds only <mark> around the matches.
  snippet.innerHTML = hit.snippet;
  button.append(meta, snippet);
  button.addEventListener("click", () => open(hit));
  item.append(button);
  return item;
}

/** Wire the panel up if the page has one (the session_search flag is on for this user). */
export function setupSearch({ open }) {
  const panel = document.getElementById("search-panel");
  if (!panel) return;
  const form = document.getElementById("search-form");
  const input = document.getElementById("search-input");
  const results = document.getElementById("search-results");
  const error = document.getElementById("search-error");
  const more = document.getElementById("search-more");
  let query = "";
  let cursor = null;
  let latest = 0; // answers to superseded requests are dropped

  function clear() {
    latest += 1;
    results.replaceChildren();
    error.hidden = true;
    more.hidden = true;
    cursor = null;
  }

  async function run(text, after) {
    if (!text) {
      clear();
      return;
    }
    const request = ++latest;
    const params = new URLSearchParams({ q: text, limit: String(PAGE_SIZE) });
    if (after) params.set("cursor", after);
    let data;
    try {
      data = await api("GET", `/api/sessions/search?${params}`);
    } catch (err) {
      if (request !== latest) return;
      error.textContent = err.message;
      error.hidden = false;
      if (!after) results.replaceChildren();
      more.hidden = true;
      return;
    }
    if (request !== latest) return;
    error.hidden = true;
    query = text;
    cursor = data.nextCursor;
    more.hidden = !cursor;
    if (!after) results.replaceChildren();
    for (const hit of data.hits) results.append(hitItem(hit, open));
    if (!after && !data.hits.length) {
      const empty = document.createElement("li");
      empty.className = "search-empty";
      empty.textContent = "No matches.";
      results.append(empty);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run(input.value.trim(), null);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      input.value = "";
      clear();
    }
  });
  more.addEventListener("click", () => run(query, cursor));
}
