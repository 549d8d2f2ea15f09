// DOM for the sidebar's project list and the tab bar; no state lives here.

import { paneId } from "./terminal-view.js";

/** Rebuild the project list; `onSelect(projectId)` runs on click or Enter/Space. */
export function renderProjectList(list, projects, currentId, onSelect) {
  list.replaceChildren(
    ...projects.map((project) => {
      const item = document.createElement("li");
      item.className = "project-item";
      item.dataset.projectId = String(project.id);
      item.setAttribute("role", "option");
      item.tabIndex = 0;
      const active = String(project.id) === String(currentId);
      item.classList.toggle("active", active);
      item.setAttribute("aria-selected", String(active));
      item.title = project.path || project.name;
      const name = document.createElement("span");
      name.className = "project-name";
      name.textContent = project.name;
      const path = document.createElement("span");
      path.className = "project-path";
      path.textContent = project.path || "";
      item.append(name, path);
      item.addEventListener("click", () => onSelect(project.id));
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          onSelect(project.id);
        }
      });
      return item;
    }),
  );
}

/**
 * What a tab shows: the name the user gave it (rename) wins, as in VS Code; otherwise the
 * title (the running command or directory where dynamic_titles is on), else the tab name.
 */
export function tabLabel({ tabName, tabNamed, title }) {
  return tabNamed ? tabName : title || tabName;
}

/**
 * Build one tab. `info` is {tabName, tabNamed, title, cwd, status}; handlers are
 * onActivate(), onClose() and onRename(tab). Only the active tab is in the tab order (the
 * WAI-ARIA tabs pattern; see wireTablistKeys); its × and ⤓ are for the pointer: Delete and
 * Shift+F10 (or the context-menu key) do the same from the keyboard.
 */
export function buildTab(sessionId, info, active, { onActivate, onClose, onRename }) {
  const tab = document.createElement("div");
  tab.className = "tab";
  tab.dataset.sessionId = sessionId;
  tab.id = `tab-${sessionId}`;
  tab.setAttribute("role", "tab");
  tab.setAttribute("aria-controls", paneId(sessionId));
  tab.setAttribute("aria-labelledby", `tab-label-${sessionId}`);
  markTab(tab, active);

  const dot = document.createElement("span");
  dot.className = "tab-dot";
  dot.setAttribute("aria-hidden", "true");
  const label = document.createElement("span");
  label.className = "tab-label";
  label.id = `tab-label-${sessionId}`;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "tab-close";
  close.tabIndex = -1;
  close.textContent = "×";
  close.setAttribute("aria-label", "Close terminal");
  close.title = "Close terminal (Delete)";
  const exporter = document.createElement("button");
  exporter.type = "button";
  exporter.className = "tab-export";
  exporter.tabIndex = -1;
  exporter.textContent = "⤓";
  exporter.setAttribute("aria-label", "Export terminal");
  exporter.setAttribute("aria-haspopup", "menu");
  exporter.title = "Export: asciicast recording or plain text (Shift+F10)";
  tab.append(dot, label, exporter, close);
  updateTab(tab, info);

  tab.addEventListener("mousedown", (event) => {
    if (event.button === 1) event.preventDefault(); // no autoscroll on middle click
  });
  tab.addEventListener("auxclick", (event) => {
    if (event.button === 1) onClose();
  });
  tab.addEventListener("click", (event) => {
    if (event.target.closest(".tab-close, .tab-rename, .tab-export")) return;
    onActivate();
  });
  exporter.addEventListener("click", (event) => {
    event.stopPropagation();
    openExportMenu(sessionId, exporter);
  });
  tab.addEventListener("contextmenu", (event) => {
    event.preventDefault();
    // From the keyboard (the context-menu key) focus comes back to the tab afterwards.
    openExportMenu(sessionId, exporter, document.activeElement === tab ? tab : exporter);
  });
  label.addEventListener("dblclick", (event) => {
    event.preventDefault();
    onRename(tab);
  });
  close.addEventListener("click", (event) => {
    event.stopPropagation();
    onClose();
  });
  return tab;
}

/** Mark a tab selected or not; the selected one is the tab strip's one stop in the tab order. */
export function markTab(tab, active) {
  tab.classList.toggle("active", active);
  tab.setAttribute("aria-selected", String(active));
  tab.tabIndex = active ? 0 : -1;
}

/**
 * Keyboard for a tab strip (WAI-ARIA tabs, manual activation): ←/→ (and Home/End) move the
 * focus between tabs, Enter or Space opens the focused one, F2 renames it, Delete closes it,
 * Shift+F10 or the context-menu key opens its export menu. Handlers get the session id.
 */
export function wireTablistKeys(tablist, { onActivate, onRename, onClose }) {
  tablist.addEventListener("keydown", (event) => {
    const tab = event.target.closest?.(".tab");
    if (!tab || event.target !== tab || event.altKey || event.ctrlKey || event.metaKey) return;
    const tabs = [...tablist.querySelectorAll(".tab")];
    const index = tabs.indexOf(tab);
    const id = tab.dataset.sessionId;
    let next = null;
    switch (event.key) {
      case "ArrowRight":
        next = tabs[(index + 1) % tabs.length];
        break;
      case "ArrowLeft":
        next = tabs[(index - 1 + tabs.length) % tabs.length];
        break;
      case "Home":
        next = tabs[0];
        break;
      case "End":
        next = tabs[tabs.length - 1];
        break;
      case "Enter":
      case " ":
        onActivate(id);
        break;
      case "F2":
        onRename(id, tab);
        break;
      case "Delete":
        onClose(id);
        break;
      case "F10":
        if (!event.shiftKey) return;
        tab.dispatchEvent(new MouseEvent("contextmenu", { bubbles: true, cancelable: true }));
        break;
      default:
        return;
    }
    event.preventDefault();
    if (next) {
      for (const other of tabs) other.tabIndex = other === next ? 0 : -1;
      next.focus();
      next.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
  });
  // Tabbing back into the strip lands on the selected tab, wherever the arrows left the stop.
  tablist.addEventListener("focusout", (event) => {
    if (tablist.contains(event.relatedTarget)) return;
    const tabs = [...tablist.querySelectorAll(".tab")];
    const selected = tabs.find((t) => t.getAttribute("aria-selected") === "true") || tabs[0];
    for (const other of tabs) other.tabIndex = other === selected ? 0 : -1;
  });
}

const EXPORT_FORMATS = [
  ["cast", "Recording (.cast)", "asciicast v3: plays in asciinema"],
  ["text", "Plain text (.txt)", "output without colours or escape sequences"],
];

/**
 * Show the export menu of a session under `anchor`: links that download
 * GET /api/terminal/<id>/export?format=cast|text. ↑/↓ (Home/End) move between its items;
 * Escape, Tab, a click elsewhere or a choice closes it; Escape puts the focus back on
 * `returnFocus`.
 */
export function openExportMenu(sessionId, anchor, returnFocus = anchor) {
  const open = document.querySelector(".tab-menu");
  if (open) {
    const same = open.dataset.sessionId === sessionId;
    open.dispatchEvent(new Event("termsys:close"));
    if (same) return;
  }
  const menu = document.createElement("div");
  menu.className = "tab-menu";
  menu.dataset.sessionId = sessionId;
  menu.setAttribute("role", "menu");
  menu.setAttribute("aria-label", "Export terminal");
  for (const [format, text, hint] of EXPORT_FORMATS) {
    const link = document.createElement("a");
    link.className = "tab-menu-item";
    link.setAttribute("role", "menuitem");
    link.href = `/api/terminal/${encodeURIComponent(sessionId)}/export?format=${format}`;
    link.download = "";
    link.textContent = text;
    link.title = hint;
    link.tabIndex = -1;
    menu.append(link);
  }
  const box = anchor.getBoundingClientRect();
  menu.style.left = `${Math.max(4, Math.min(box.left, window.innerWidth - 200))}px`;
  menu.style.top = `${box.bottom + 4}px`;
  document.body.append(menu);

  const onPointer = (event) => {
    if (!menu.contains(event.target) && event.target !== anchor) close();
  };
  const items = [...menu.querySelectorAll("[role=menuitem]")];
  const onKey = (event) => {
    const index = items.indexOf(document.activeElement);
    let next = null;
    switch (event.key) {
      case "Escape":
        event.preventDefault();
        close();
        returnFocus.focus();
        return;
      case "Tab":
        close();
        return;
      case "ArrowDown":
        next = items[(index + 1) % items.length];
        break;
      case "ArrowUp":
        next = items[(index - 1 + items.length) % items.length];
        break;
      case "Home":
        next = items[0];
        break;
      case "End":
        next = items[items.length - 1];
        break;
      default:
        return;
    }
    event.preventDefault();
    event.stopPropagation();
    next.focus();
  };
  const close = () => {
    document.removeEventListener("mousedown", onPointer, true);
    document.removeEventListener("keydown", onKey, true);
    menu.remove();
  };
  menu.addEventListener("termsys:close", close);
  menu.addEventListener("click", (event) => {
    if (event.target.closest("a")) setTimeout(close, 0);
  });
  document.addEventListener("mousedown", onPointer, true);
  document.addEventListener("keydown", onKey, true);
  menu.querySelector("a").focus();
}

/** Refresh a tab's label, status dot (data-state) and tooltip. */
export function updateTab(tab, info) {
  const { tabName, title, cwd, status } = info;
  const label = tab.querySelector(".tab-label");
  if (label && !label.hidden) label.textContent = tabLabel(info);
  tab.dataset.state = status;
  const details = [title !== tabName ? title : "", cwd].filter(Boolean).join(" — ");
  tab.title = details ? `${tabName}: ${details}` : tabName;
}

/**
 * Swap the tab's label for a text input holding `original`. Enter or blur saves through
 * `save(newName)` (a promise); Escape cancels. The label shows the new name at once and
 * goes back to what it showed before if saving fails. `done(how, refocus)` runs when the
 * input goes (how: "saving", "unchanged" or "cancelled"; refocus: the input had the focus,
 * which now needs a place) and again with "failed" if saving fails.
 */
export function editTabLabel(tab, original, save, done, { clearable = false } = {}) {
  const label = tab.querySelector(".tab-label");
  if (!label || tab.querySelector(".tab-rename")) return;
  const shown = label.textContent;
  const input = document.createElement("input");
  input.className = "tab-rename";
  input.value = original;
  input.maxLength = 100;
  input.setAttribute("aria-label", "Terminal name");
  label.hidden = true;
  label.after(input);
  input.focus();
  input.select();

  let finished = false;
  const finish = async (commit) => {
    if (finished) return;
    finished = true;
    const name = input.value.trim();
    const refocus = tab.contains(document.activeElement);
    // Emptied (where the caller allows it): saved as "", which takes the user's name back.
    const saving = commit && (name ? name !== original : clearable);
    input.remove();
    label.hidden = false;
    if (saving && name) label.textContent = name;
    done(saving ? "saving" : commit ? "unchanged" : "cancelled", refocus);
    if (!saving) return;
    try {
      await save(name);
    } catch (err) {
      label.textContent = shown;
      done("failed", false);
    }
  };
  input.addEventListener("keydown", (event) => {
    event.stopPropagation();
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  input.addEventListener("click", (event) => event.stopPropagation());
  input.addEventListener("dblclick", (event) => event.stopPropagation());
}
