// The workspace page: projects in the sidebar, terminal tabs for the selected project.

import { api, ApiError, showError } from "./api.js";
import {
  buildTab,
  editTabLabel,
  markTab,
  renderProjectList,
  tabLabel,
  updateTab,
  wireTablistKeys,
} from "./render.js";
import { setupSearch } from "./search.js";
import { TerminalView } from "./terminal-view.js";

// Connections kept open across tabs and projects; past this the least recently used closes
// (its screen stays; showing it again continues from where it stopped).
const MAX_LIVE_VIEWS = 24;
// Terminals kept in the page; past this the least recently used idle one is freed.
const MAX_VIEWS = 120;
const LAST_PROJECT_KEY = "termsys.lastProject";
const LAST_TAB_KEY = (projectId) => `termsys.lastTab.${projectId}`;
const ENDED_STATES = new Set(["exited", "killed"]);
const LIVE_STATES = new Set(["creating", "active", "detached"]);
// A project's tab list is fetched again when the user switches to it; on focus, on coming
// back to the page or on hovering a tab, at most this often.
const REFRESH_MIN_MS = 3000;
// Under this width the sidebar is a drawer behind the ☰ button (see workspace.css).
const NARROW = window.matchMedia("(max-width: 719.98px)");

const $ = (id) => document.getElementById(id);
const el = {
  projectList: $("project-list"),
  projectListEmpty: $("project-list-empty"),
  layout: $("layout"),
  sidebar: $("sidebar"),
  sidebarToggle: $("sidebar-toggle"),
  sidebarBackdrop: $("sidebar-backdrop"),
  projectForm: $("new-project-form"),
  projectError: $("new-project-error"),
  currentProjectName: $("current-project-name"),
  tabbar: $("tabbar"),
  tabs: $("tabs"),
  newTerminal: $("new-terminal"),
  emptyNewTerminal: $("empty-new-terminal"),
  profileSelect: $("new-terminal-profile"),
  status: $("connection-status"),
  area: $("terminal-area"),
  emptyNoProjects: $("empty-no-projects"),
  emptyNoTerminals: $("empty-no-terminals"),
  emptyLoading: $("empty-loading"),
};

const profiles = JSON.parse($("termsys-profiles")?.textContent || "[]");

const state = {
  projects: [],
  currentProjectId: null,
  sessionsByProject: new Map(), // projectId -> [session], in tab order
  views: new Map(), // sessionId -> TerminalView
  activeView: null,
  loadedProjects: new Set(), // projects whose snapshot has been applied (once per project)
  loading: new Map(), // projectId -> snapshot request in flight
  refreshing: new Map(), // projectId -> tab list request in flight
  refreshedAt: new Map(), // projectId -> when its tab list last arrived (Date.now())
  // sessionId -> when this page opened / closed it (performance.now()): a list requested
  // before that is older than what the page knows about the session.
  openedAt: new Map(),
  closedAt: new Map(),
  creating: false,
};

const storage = {
  get(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (err) {
      return null;
    }
  },
  set(key, value) {
    try {
      window.localStorage.setItem(key, value);
    } catch (err) {
      // Private mode or quota: remembering is a convenience only.
    }
  },
};

// ---------------------------------------------------------------- projects

function currentSessions() {
  return state.sessionsByProject.get(state.currentProjectId) || [];
}

function findSession(sessionId) {
  for (const sessions of state.sessionsByProject.values()) {
    const session = sessions.find((s) => s.id === sessionId);
    if (session) return session;
  }
  return null;
}

function renderProjects() {
  renderProjectList(el.projectList, state.projects, state.currentProjectId, selectProject);
  el.projectListEmpty.hidden = state.projects.length > 0;
}

async function loadProjects() {
  const data = await api("GET", "/api/projects");
  const fetched = data.projects || [];
  const listed = new Set(fetched.map((p) => p.id));
  // A project created while this list was on its way is newer than the list: keep it.
  state.projects = [...fetched, ...state.projects.filter((p) => !listed.has(p.id))];
  renderProjects();
}

async function selectProject(projectId) {
  const project = state.projects.find((p) => String(p.id) === String(projectId));
  if (!project) return;
  state.currentProjectId = project.id;
  storage.set(LAST_PROJECT_KEY, String(project.id));
  renderProjects();
  closeSidebar();
  el.currentProjectName.textContent = project.name;
  el.currentProjectName.title = project.path || "";

  // A project seen before is all in the page already: its terminals and their connections.
  // Show them at once; then ask whether another window or device opened or closed any.
  if (state.loadedProjects.has(project.id)) {
    showProjectTabs();
    refreshProject(project.id).catch(() => {}); // the tabs shown stay right as they are
    return;
  }
  hideActiveView();
  renderTabs();
  renderEmptyStates(true);
  try {
    await loadProject(project.id);
  } catch (err) {
    showError(err);
  }
  if (state.currentProjectId === project.id) showProjectTabs();
}

/** Fetch a project's snapshot (once) and build every one of its terminals from it. */
function loadProject(projectId) {
  let pending = state.loading.get(projectId);
  if (!pending) {
    const url = `/api/workspace/projects/${encodeURIComponent(projectId)}/snapshot`;
    const requestedAt = performance.now();
    pending = api("GET", url)
      .then((data) => {
        applySnapshot(projectId, data.terminals || [], requestedAt);
        state.loadedProjects.add(projectId);
        state.refreshedAt.set(projectId, Date.now());
      })
      .finally(() => state.loading.delete(projectId));
    state.loading.set(projectId, pending);
  }
  return pending;
}

/**
 * Create each terminal with its scrollback written in, so any tab shows at once. Each is
 * built at the size its output was drawn at (a screen drawn at column 100 stays intact) and
 * fitted to the page when shown.
 */
function applySnapshot(projectId, terminals, requestedAt) {
  const sessions = [];
  for (const { scrollback, ...session } of terminals) {
    sessions.push(session);
    if (state.views.has(session.id) || isClosedSince(session.id, requestedAt)) continue;
    state.views.set(session.id, newView(session, { scrollback }));
  }
  mergeSessions(projectId, sessions, requestedAt);
  freeIdleViews();
}

function newView(session, options = {}) {
  const sized = state.activeView?.term.element ? state.activeView.term : null;
  const known = Number.isInteger(session.cols) && Number.isInteger(session.rows);
  return new TerminalView({
    session,
    container: el.area,
    onChange: onViewChange,
    onLeave: focusActiveTab,
    describedBy: "keyboard-help",
    cols: known ? session.cols : sized?.cols,
    rows: known ? session.rows : sized?.rows,
    ...options,
  });
}

function isClosedSince(sessionId, requestedAt) {
  return (state.closedAt.get(sessionId) ?? -Infinity) > requestedAt;
}

function isOpenedSince(sessionId, requestedAt) {
  return (state.openedAt.get(sessionId) ?? -Infinity) > requestedAt;
}

/**
 * Replace a project's session list with the server's (requested at `requestedAt`), keeping
 * the views of sessions that remain. What this page did after the request left is newer than
 * the list: a tab opened here since stays, a tab closed here since stays closed. Returns
 * whether the tabs changed (others added or removed).
 */
function mergeSessions(projectId, listed, requestedAt) {
  const old = state.sessionsByProject.get(projectId) || [];
  const sessions = listed.filter((s) => !isClosedSince(s.id, requestedAt));
  const ids = new Set(sessions.map((s) => s.id));
  for (const session of old) {
    if (ids.has(session.id)) continue;
    if (isOpenedSince(session.id, requestedAt)) {
      sessions.push(session);
      ids.add(session.id);
    }
  }
  for (const session of old) {
    if (!ids.has(session.id)) disposeView(session.id);
  }
  for (const session of sessions) {
    const view = state.views.get(session.id);
    if (!view) continue;
    // The live connection knows better than a list fetched a moment ago, but the list has
    // what no connection says: a rename, a cd, a new shell started from another window.
    const { tabName, tabNamed, cwd } = session;
    Object.assign(view.session, { tabName, tabNamed, cwd });
    if (!view.isLive) view.session.title = session.title; // no connection tells it otherwise
    if (view.ended && view.revivable && LIVE_STATES.has(session.state)) {
      view.followRevival({ state: session.state, pid: session.pid });
    }
  }
  const changed =
    old.length !== sessions.length || old.some((session, i) => session.id !== sessions[i].id);
  state.sessionsByProject.set(projectId, sessions);
  return changed;
}

/**
 * Fetch a loaded project's tab list again (tabs opened or closed in another window or
 * device, renames, working directories) and show it without touching the views that stay.
 */
function refreshProject(projectId) {
  let pending = state.refreshing.get(projectId);
  if (pending) return pending;
  if (!state.loadedProjects.has(projectId)) return loadProject(projectId);
  const url = `/api/workspace/projects/${encodeURIComponent(projectId)}/terminals`;
  const requestedAt = performance.now();
  pending = api("GET", url)
    .then((data) => {
      state.refreshedAt.set(projectId, Date.now());
      const changed = mergeSessions(projectId, data.terminals || [], requestedAt);
      if (projectId !== state.currentProjectId) return;
      if (changed && !el.tabs.querySelector(".tab-rename")) showProjectTabs();
      else currentSessions().forEach(refreshTab);
    })
    .finally(() => state.refreshing.delete(projectId));
  state.refreshing.set(projectId, pending);
  return pending;
}

/** Refresh the current project's tab list unless that was done a moment ago. */
function refreshCurrentProject() {
  const projectId = state.currentProjectId;
  if (projectId === null || !state.loadedProjects.has(projectId)) return;
  if (Date.now() - (state.refreshedAt.get(projectId) || 0) < REFRESH_MIN_MS) return;
  state.refreshedAt.set(projectId, Date.now()); // one request, however many events
  refreshProject(projectId).catch(() => {}); // offline: the tabs say so themselves
}

/** Render the current project's tabs and activate the remembered (or first) one. */
function showProjectTabs() {
  const sessions = currentSessions();
  const activeId = state.activeView?.session.id;
  if (activeId && sessions.some((s) => s.id === activeId)) {
    renderTabs();
    renderEmptyStates(false);
    return;
  }
  const remembered = storage.get(LAST_TAB_KEY(state.currentProjectId));
  const target = sessions.find((s) => s.id === remembered) || sessions[0];
  if (target) activateTab(target.id);
  else {
    hideActiveView();
    renderTabs();
  }
  renderEmptyStates(false);
}

async function createProject(event) {
  event.preventDefault();
  const form = el.projectForm;
  const name = form.elements.name.value.trim();
  const path = form.elements.path.value.trim();
  el.projectError.hidden = true;
  if (!name) {
    showProjectError("Give the project a name.");
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const body = path ? { name, path } : { name };
    const data = await api("POST", "/api/projects", body);
    state.projects.push(data.project);
    form.reset();
    await selectProject(data.project.id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    showProjectError(err.message);
  } finally {
    button.disabled = false;
  }
}

function showProjectError(message) {
  el.projectError.textContent = message;
  el.projectError.hidden = false;
}

// ---------------------------------------------------------------- tabs

function tabStatus(session) {
  const view = state.views.get(session.id);
  if (view) return view.status;
  return ENDED_STATES.has(session.state) ? "exited" : "idle";
}

function tabInfo(session) {
  const view = state.views.get(session.id);
  const current = view ? view.session : session;
  return {
    tabName: current.tabName,
    tabNamed: Boolean(current.tabNamed),
    title: current.title,
    cwd: current.cwd,
    status: tabStatus(session),
  };
}

function renderTabs() {
  const activeId = state.activeView?.session.id;
  const focused = el.tabs.contains(document.activeElement)
    ? document.activeElement.closest(".tab")?.dataset.sessionId
    : null;
  el.tabbar.hidden = state.currentProjectId === null;
  el.tabs.replaceChildren(
    ...currentSessions().map((session) =>
      buildTab(session.id, tabInfo(session), session.id === activeId, {
        onActivate: () => activateTab(session.id),
        onClose: () => closeTab(session.id),
        onRename: (tab) => startRename(session.id, tab),
      }),
    ),
  );
  // Without an active tab the first one is the strip's stop in the tab order.
  const first = el.tabs.querySelector(".tab");
  if (first && !el.tabs.querySelector('.tab[tabindex="0"]')) first.tabIndex = 0;
  if (focused) (tabElement(focused) || el.tabs.querySelector('.tab[tabindex="0"]'))?.focus();
  updateStatusIndicator();
}

/** Move the keyboard focus from the terminal to its tab (Ctrl+Shift+F6 in a terminal). */
function focusActiveTab() {
  const id = state.activeView?.session.id;
  (id && tabElement(id))?.focus();
}

/** Move the active mark in place; false when the tab bar is not showing these sessions. */
function markActiveTab(sessionId) {
  const tabs = [...el.tabs.querySelectorAll(".tab")];
  const ids = currentSessions().map((s) => s.id);
  if (tabs.length !== ids.length || tabs.some((tab, i) => tab.dataset.sessionId !== ids[i])) {
    return false;
  }
  for (const tab of tabs) markTab(tab, tab.dataset.sessionId === sessionId);
  if (tabs.length && !tabs.some((tab) => tab.tabIndex === 0)) tabs[0].tabIndex = 0;
  updateStatusIndicator();
  return true;
}

function refreshTab(session) {
  const tab = tabElement(session.id);
  if (tab) updateTab(tab, tabInfo(session));
}

function tabElement(sessionId) {
  return el.tabs.querySelector(`.tab[data-session-id="${CSS.escape(sessionId)}"]`);
}

function onViewChange(view) {
  const session = findSession(view.session.id);
  if (session) {
    session.state = view.session.state;
    session.title = view.session.title;
    session.exitCode = view.session.exitCode;
    refreshTab(session);
  }
  if (view === state.activeView) updateStatusIndicator();
}

function updateStatusIndicator() {
  const view = state.activeView;
  if (!view) {
    el.status.hidden = true;
    el.status.dataset.state = "none";
    return;
  }
  el.status.hidden = false;
  el.status.dataset.state = view.status === "idle" ? "connecting" : view.status;
  const text = view.statusText() || "connecting…";
  el.status.querySelector(".status-text").textContent = text;
  // Narrow windows show the dot only: the text is its tooltip.
  el.status.title = view.status === "error" ? view.errorMessage || text : text;
}

function hideActiveView() {
  if (state.activeView) state.activeView.hide();
  state.activeView = null;
}

function activateTab(sessionId) {
  const session = findSession(sessionId);
  if (!session) return;
  let view = state.views.get(sessionId);
  if (view && view === state.activeView) {
    view.show();
    return;
  }
  hideActiveView();
  if (!view) {
    view = newView(session);
    state.views.set(sessionId, view);
  }
  state.activeView = view;
  view.show();
  storage.set(LAST_TAB_KEY(session.projectId ?? state.currentProjectId), sessionId);
  // Rebuilding the tabs under a double-click would swallow the rename gesture.
  if (!markActiveTab(sessionId)) renderTabs();
  renderEmptyStates(false);
  tabElement(sessionId)?.scrollIntoView({ block: "nearest", inline: "nearest" });
  evictLeastRecentlyUsed();
}

function evictLeastRecentlyUsed() {
  const live = [...state.views.values()].filter((v) => v.isLive);
  if (live.length <= MAX_LIVE_VIEWS) return;
  const candidates = live
    .filter((v) => v !== state.activeView)
    .sort((a, b) => a.lastUsed - b.lastUsed);
  let count = live.length;
  while (count > MAX_LIVE_VIEWS && candidates.length) {
    candidates.shift().suspend();
    count -= 1;
  }
}

/** Past MAX_VIEWS terminals in the page, free the least recently used unconnected ones. */
function freeIdleViews() {
  if (state.views.size <= MAX_VIEWS) return;
  const candidates = [...state.views.values()]
    .filter((v) => v !== state.activeView && !v.isLive)
    .sort((a, b) => a.lastUsed - b.lastUsed);
  while (state.views.size > MAX_VIEWS && candidates.length) {
    disposeView(candidates.shift().session.id);
  }
}

function disposeView(sessionId) {
  const view = state.views.get(sessionId);
  if (!view) return;
  if (view === state.activeView) state.activeView = null;
  view.dispose();
  state.views.delete(sessionId);
  const session = findSession(sessionId);
  if (session) refreshTab(session);
}

function nextTabName() {
  const taken = new Set(currentSessions().map((s) => s.tabName));
  let n = currentSessions().length + 1;
  while (taken.has(`Terminal ${n}`)) n += 1;
  return `Terminal ${n}`;
}

async function createTerminal() {
  const projectId = state.currentProjectId;
  if (projectId === null || state.creating) return;
  state.creating = true;
  el.newTerminal.disabled = true;
  el.emptyNewTerminal.disabled = true;
  try {
    const type = el.profileSelect.hidden ? profiles[0] || "system" : el.profileSelect.value;
    const data = await api("POST", "/api/terminal/create", {
      projectId,
      type,
      tabName: nextTabName(),
    });
    const session = data.session;
    // A tab list requested before now (the project may still be loading) does not know it.
    state.openedAt.set(session.id, performance.now());
    const sessions = state.sessionsByProject.get(projectId) || [];
    sessions.push(session);
    state.sessionsByProject.set(projectId, sessions);
    const view = newView(session, {
      connectionUrl: data.connectionUrl,
      // A new session's output starts at byte 0: attach from there, nothing to reset.
      scrollback: { data: "", offset: 0, end: 0, pruned: false },
    });
    state.views.set(session.id, view);
    if (state.currentProjectId === projectId) activateTab(session.id);
  } catch (err) {
    showError(err);
    // Refused for the limit: the project may have tabs opened elsewhere that this page
    // does not show yet.
    if (err instanceof ApiError && err.code === "session_limit_reached") {
      refreshProject(projectId).catch(() => {});
    }
  } finally {
    state.creating = false;
    el.newTerminal.disabled = false;
    el.emptyNewTerminal.disabled = false;
  }
}

async function closeTab(sessionId) {
  const session = findSession(sessionId);
  if (!session) return;
  const view = state.views.get(sessionId);
  const ended = view ? view.ended || view.status === "exited" : ENDED_STATES.has(session.state);
  const name = tabLabel(tabInfo(session)); // what the tab shows
  if (!ended && !window.confirm(`Close "${name}"? Everything running in it will be stopped.`)) {
    return;
  }
  try {
    await api("POST", `/api/terminal/${encodeURIComponent(sessionId)}/close`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) {
      showError(err);
      return;
    }
  }
  removeTab(sessionId);
}

function removeTab(sessionId) {
  const session = findSession(sessionId);
  if (!session) return;
  state.closedAt.set(sessionId, performance.now());
  const hadFocus = el.tabs.contains(document.activeElement);
  const projectId = session.projectId ?? state.currentProjectId;
  const sessions = state.sessionsByProject.get(projectId) || currentSessions();
  const index = sessions.findIndex((s) => s.id === sessionId);
  const wasActive = state.activeView?.session.id === sessionId;
  if (index >= 0) sessions.splice(index, 1);
  disposeView(sessionId);
  if (wasActive && sessions.length) {
    activateTab(sessions[Math.min(index, sessions.length - 1)].id);
  } else {
    renderTabs();
    renderEmptyStates(false);
  }
  // Closed from the keyboard (Delete): stay in the tab strip.
  if (hadFocus && !el.tabs.contains(document.activeElement)) focusActiveTab();
}

function startRename(sessionId, tab) {
  const session = findSession(sessionId);
  if (!session) return;
  const fromKeyboard = document.activeElement === tab;
  const save = async (tabName) => {
    try {
      const path = `/api/terminal/${encodeURIComponent(sessionId)}/rename`;
      const data = await api("POST", path, { tabName });
      applyTabName(sessionId, data.session?.tabName ?? tabName, data.session?.tabNamed ?? true);
    } catch (err) {
      showError(err);
      throw err;
    }
  };
  const done = (how, refocus) => {
    if (how === "failed") {
      refreshTab(session); // what it showed, with any title since
      return;
    }
    if (!markActiveTab(state.activeView?.session.id)) renderTabs(); // changed meanwhile
    if (!refocus) return; // the user moved on (clicked elsewhere)
    if (fromKeyboard) tabElement(sessionId)?.focus();
    else if (state.activeView?.session.id === sessionId) state.activeView.term.focus();
  };
  // Edit what the tab shows: the name the user gave it, else the title they see. Emptying a
  // name the user gave makes the tab follow the title again.
  editTabLabel(tab, tabLabel(tabInfo(session)).slice(0, 100), save, done, {
    clearable: Boolean(session.tabNamed),
  });
}

function applyTabName(sessionId, tabName, tabNamed) {
  const session = findSession(sessionId);
  const view = state.views.get(sessionId);
  for (const s of [session, view?.session]) {
    if (!s) continue;
    if (s.title === s.tabName) s.title = tabName; // a title that was the old name
    s.tabName = tabName;
    // Named: from now on the tab shows the name, not the process title; else the title.
    s.tabNamed = tabNamed;
  }
  if (session) refreshTab(session);
}

// ---------------------------------------------------------------- page

function renderEmptyStates(loading) {
  const noProjects = state.projects.length === 0;
  const noTerminals = !noProjects && state.currentProjectId !== null && !currentSessions().length;
  el.emptyNoProjects.hidden = !noProjects;
  el.emptyLoading.hidden = !(loading && !noProjects);
  el.emptyNoTerminals.hidden = loading || !noTerminals;
  el.tabbar.hidden = noProjects || state.currentProjectId === null;
}

function setupProfiles() {
  if (profiles.length <= 1) return;
  for (const name of profiles) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    el.profileSelect.append(option);
  }
  // Sorted names would put e.g. "claude" first; the plain shell is the expected default.
  if (profiles.includes("system")) el.profileSelect.value = "system";
  el.profileSelect.hidden = false;
}

function setupResizing() {
  let frame = 0;
  const refit = () => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => state.activeView?.fit());
  };
  new ResizeObserver(refit).observe(el.area);
  window.addEventListener("resize", refit);
}

function setupReconnectTriggers() {
  const retryAll = () => state.views.forEach((view) => view.retryNow());
  window.addEventListener("online", () => {
    retryAll();
    refreshCurrentProject();
  });
  // Back to this window: another one may have opened, closed or revived terminals meanwhile.
  window.addEventListener("focus", refreshCurrentProject);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    retryAll();
    refreshCurrentProject();
  });
  // The tooltip names the working directory: make it the current one before it shows.
  el.tabs.addEventListener("mouseover", (event) => {
    if (event.target.closest?.(".tab")) refreshCurrentProject();
  });
}

/** The sidebar as a drawer, on narrow windows: ☰ opens it, a choice, Escape or a tap
 *  beside it closes it. */
function setupSidebar() {
  el.sidebarToggle.addEventListener("click", () => {
    if (el.layout.classList.contains("sidebar-open")) closeSidebar();
    else openSidebar();
  });
  el.sidebarBackdrop.addEventListener("click", () => closeSidebar());
  el.sidebar.addEventListener("keydown", (event) => {
    const open = el.layout.classList.contains("sidebar-open");
    if (event.key === "Escape" && NARROW.matches && open) {
      event.preventDefault();
      closeSidebar();
      el.sidebarToggle.focus();
    }
  });
  NARROW.addEventListener("change", () => closeSidebar());
}

function openSidebar() {
  el.layout.classList.add("sidebar-open");
  el.sidebarToggle.setAttribute("aria-expanded", "true");
  const active = el.projectList.querySelector(".project-item.active");
  (active || el.sidebar.querySelector("li, input"))?.focus();
}

function closeSidebar() {
  if (!el.layout.classList.contains("sidebar-open")) return;
  const hadFocus = el.sidebar.contains(document.activeElement);
  el.layout.classList.remove("sidebar-open");
  el.sidebarToggle.setAttribute("aria-expanded", "false");
  if (hadFocus) state.activeView?.term.focus();
}

/** Open a search hit: its project, then its tab if the terminal is still open. */
async function openSearchHit(hit) {
  const projectId = hit.project.id;
  try {
    // A project or terminal opened in another window or device is not in this page yet.
    if (!state.projects.some((p) => String(p.id) === String(projectId))) await loadProjects();
    await selectProject(projectId);
    if (!findSession(hit.session.id) && state.currentProjectId === projectId) {
      await refreshProject(projectId);
    }
  } catch (err) {
    showError(err);
    return;
  }
  if (findSession(hit.session.id)) activateTab(hit.session.id);
  else showError(new Error("That terminal has been closed; its project is open."));
}

async function init() {
  setupProfiles();
  setupSearch({ open: openSearchHit });
  setupResizing();
  setupReconnectTriggers();
  setupSidebar();
  wireTablistKeys(el.tabs, {
    onActivate: activateTab,
    onClose: closeTab,
    onRename: startRename,
  });
  el.projectForm.addEventListener("submit", createProject);
  el.newTerminal.addEventListener("click", createTerminal);
  el.emptyNewTerminal.addEventListener("click", createTerminal);

  window.termsys = {
    activeTerminal: () => state.activeView?.term ?? null,
    activeSessionId: () => state.activeView?.session.id ?? null,
    // The xterm of any tab in the page (shown or not), or null.
    terminal: (sessionId) => state.views.get(sessionId)?.term ?? null,
  };

  try {
    await loadProjects();
  } catch (err) {
    showError(err);
  }
  // The user may have created or picked a project while the page was still loading.
  if (state.currentProjectId != null) return;
  renderEmptyStates(false);
  if (!state.projects.length) {
    if (NARROW.matches) openSidebar(); // the form to create one is in the drawer
    el.projectForm.elements.name.focus();
    return;
  }
  const remembered = storage.get(LAST_PROJECT_KEY);
  const project = state.projects.find((p) => String(p.id) === remembered) || state.projects[0];
  await selectProject(project.id);
}

init();
