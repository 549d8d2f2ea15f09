// One terminal tab: an xterm.js instance, its pane, and the WebSocket that feeds it.

import { api, ApiError, redirectToLogin, stillSignedIn, toast } from "./api.js";

const ACK_BYTES = 32 * 1024;
const ACK_IDLE_MS = 50;
const PING_MS = 25_000;
// No frame at all (not even a pong) for this long means the connection is dead.
const STALE_MS = 2 * PING_MS + 10_000;
const MAX_FRAME = 64 * 1024;
const BACKOFF_START_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const THROTTLED_MIN_MS = 5_000;
const ERROR_GRACE_MS = 150;
// A paste the program does not read is refused frame by frame: one notice for all of them.
const OVERFLOW_GRACE_MS = 400;
const LIVE_STATES = new Set(["creating", "active", "detached"]);

/**
 * Ctrl+Shift+F6 moves the focus out of a terminal (the workspace: to its tab), so a keyboard
 * user is never trapped: Tab, Shift+Tab and Escape belong to the shell and its programs. No
 * common shell, editor or pager binds it, and browsers and desktops leave it to the page.
 * The page's help text and README's "Using it" name it.
 */
function isLeaveKey(event) {
  return event.key === "F6" && event.ctrlKey && event.shiftKey && !event.altKey && !event.metaKey;
}

const THEME = {
  background: "#0f1117",
  foreground: "#d4d9e3",
  cursor: "#e6e9ef",
  cursorAccent: "#0f1117",
  selectionBackground: "rgba(110, 145, 210, 0.35)",
  black: "#1b1f2a",
  red: "#e06c75",
  green: "#98c379",
  yellow: "#e5c07b",
  blue: "#61afef",
  magenta: "#c678dd",
  cyan: "#56b6c2",
  white: "#c8cdd8",
  brightBlack: "#5c6370",
  brightRed: "#ef8891",
  brightGreen: "#b5e08f",
  brightYellow: "#f0d394",
  brightBlue: "#82c2f7",
  brightMagenta: "#d79af0",
  brightCyan: "#77cdd8",
  brightWhite: "#f2f4f8",
};

const FONT_FAMILY = [
  '"JetBrains Mono"', '"Fira Code"', '"Cascadia Mono"', '"SF Mono"', "Menlo", "Monaco",
  "Consolas", '"DejaVu Sans Mono"', '"Liberation Mono"', '"Ubuntu Mono"', "monospace",
].join(", ");

/** Messages for close codes after which reconnecting cannot help. */
const FINAL_CLOSE = {
  4403: "You are not allowed to open this terminal.",
  4404: "This terminal no longer exists.",
  4409: "Too many connections to this terminal; close another tab and try again.",
};

const encoder = new TextEncoder();

function latin1Bytes(s) {
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i) & 0xff;
  return bytes;
}

/** Decode base64 (as the snapshot API sends output) to bytes. */
function base64Bytes(text) {
  return latin1Bytes(window.atob(text));
}

/** The id of a session's terminal pane (a tab's aria-controls). */
export function paneId(sessionId) {
  return `pane-${sessionId}`;
}

function socketUrl(path) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${path}`;
}

/**
 * A terminal tab's view and connection.
 *
 * `status` is one of: idle (not connected), connecting, connected, reconnecting,
 * exited, error. `onChange(view)` fires whenever status, title or exit code changes.
 *
 * `offset` is the absolute byte offset of the session's output this view has received up
 * to (null: nothing yet). Every (re)connect asks the server for what follows it, so output
 * is never written twice and the screen is never reset — unless the server says the bytes
 * in between are gone (`pruned`), in which case the view resets and takes the replay.
 * `scrollback` ({data: base64, offset, end, pruned}, from the project snapshot) is written
 * at once, before any connection, and the first connection continues from its end.
 */
export class TerminalView {
  constructor({
    session,
    connectionUrl,
    container,
    onChange,
    onLeave,
    scrollback,
    cols,
    rows,
    readOnly,
    fixedSize,
    describedBy,
  }) {
    this.session = { ...session };
    // A read-only view (staff watching someone's terminal) sends no input; the server
    // enforces it too, and says so in hello (`readOnly`).
    this.readOnly = Boolean(readOnly);
    this.connectionPath = connectionUrl || `/ws/terminals/${encodeURIComponent(session.id)}/`;
    this.onChange = onChange || (() => {});
    // Called on Ctrl+Shift+F6 (isLeaveKey) in the terminal: move the focus somewhere else.
    this.onLeave = onLeave || (() => {});
    // Keep cols x rows whatever the pane's size (a viewer renders at the owner's size).
    this.fixedSize = Boolean(fixedSize && cols && rows);
    this.describedBy = describedBy || "";
    this.status = "idle";
    this.errorMessage = "";
    this.exitCode = session.exitCode ?? null;
    this.ended = session.state === "exited" || session.state === "killed";
    // Its shell died with the server (a restart): Enter starts a new one in place.
    this.revivable = Boolean(session.revivable);
    this.reviving = false;
    this.lastUsed = 0;
    this.disposed = false;
    this.offset = null;

    this.ws = null;
    this.generation = 0;
    this.attempt = 0;
    this.signedOutRetried = false; // a 4401 answered by connecting again (handleSignedOut)
    this.retryTimer = null;
    this.pingTimer = null;
    this.serverError = "";
    this.errorTimer = null;
    this.lastFrameAt = 0;
    this.ackPending = 0;
    this.ackTimer = null;
    this.sentSize = "";
    this.overflowBytes = 0;
    this.overflowCount = 0;
    this.overflowMessage = "";
    this.overflowTimer = null;

    this.pane = document.createElement("div");
    this.pane.className = "terminal-pane";
    this.pane.classList.toggle("fixed-size", this.fixedSize);
    this.pane.dataset.sessionId = session.id;
    this.pane.id = paneId(session.id);
    this.pane.setAttribute("role", "tabpanel");
    container.append(this.pane);

    this.term = new window.Terminal({
      ...(cols && rows ? { cols, rows } : {}),
      allowProposedApi: false,
      cursorBlink: true,
      fontFamily: FONT_FAMILY,
      fontSize: 14,
      lineHeight: 1.15,
      scrollback: 10000,
      theme: THEME,
      disableStdin: this.readOnly,
    });
    this.fitAddon = new window.FitAddon.FitAddon();
    this.term.loadAddon(this.fitAddon);
    this.term.onData((s) => {
      if (this.ended && this.revivable && s === "\r") this.revive();
      else this.sendInput(encoder.encode(s));
    });
    this.term.onBinary((s) => this.sendInput(latin1Bytes(s)));
    this.term.onResize(() => this.sendResize());
    this.term.attachCustomKeyEventHandler((event) => {
      if (!isLeaveKey(event)) return true;
      event.preventDefault();
      if (event.type === "keydown") this.onLeave(this);
      return false; // xterm neither sends it to the shell nor handles it
    });
    if (scrollback) this.seed(scrollback);
  }

  /** Write output fetched over HTTP and continue from its end; an ended session is done. */
  seed(scrollback) {
    const bytes = base64Bytes(scrollback.data || "");
    if (bytes.length) this.term.write(bytes);
    this.offset = scrollback.end;
    if (this.ended) {
      // Nothing can follow: no connection needed to show the whole story.
      this.writeExitNotice();
      this.status = "exited";
    }
  }

  get isLive() {
    return this.ws !== null || this.retryTimer !== null;
  }

  /** Make this pane visible, open the terminal if needed, fit and focus it. */
  show() {
    this.lastUsed = Date.now();
    this.pane.classList.add("active");
    if (!this.term.element) {
      this.term.open(this.pane);
      // Screen readers announce how to leave the terminal (the page's keyboard help).
      if (this.describedBy) {
        this.term.textarea?.setAttribute("aria-describedby", this.describedBy);
      }
    }
    this.fit();
    if (this.status === "idle" || this.status === "error") this.connect();
    // Don't pull the keyboard away from a field the user is typing in (say, a new project's
    // name while the page is still loading): their keystrokes would land in the shell.
    const active = document.activeElement;
    const typingElsewhere =
      active?.matches?.("input, textarea, select") && !active.closest(".terminal-pane");
    if (!typingElsewhere) this.term.focus();
  }

  hide() {
    this.pane.classList.remove("active");
  }

  /** Fit the terminal to its pane (only while visible) and tell the server. */
  fit() {
    if (!this.term.element || !this.pane.classList.contains("active")) return;
    if (this.fixedSize) return;
    try {
      this.fitAddon.fit();
    } catch (err) {
      // A pane without layout (e.g. mid-transition) has no size to fit to.
    }
    this.sendResize();
  }

  /**
   * A view drawn at the owner's size (the read-only view) takes the size the server sends, in
   * stream order: the output that follows was written for it.
   */
  followSize({ cols, rows }) {
    if (!this.fixedSize || !Number.isInteger(cols) || !Number.isInteger(rows)) return;
    if (cols < 1 || rows < 1) return;
    // After the output already queued in xterm.js, which was written for the old size.
    this.term.write("", () => {
      if (cols !== this.term.cols || rows !== this.term.rows) this.term.resize(cols, rows);
    });
  }

  /** Reconnect right away if waiting to retry (e.g. the browser came back online). */
  retryNow() {
    if (this.retryTimer !== null) this.connect();
  }

  connect() {
    if (this.disposed) return;
    this.clearRetry();
    this.dropSocket();
    const generation = ++this.generation;
    const separator = this.connectionPath.includes("?") ? "&" : "?";
    const query = this.offset === null ? "" : `${separator}offset=${this.offset}`;
    const ws = new WebSocket(socketUrl(this.connectionPath + query));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.ackPending = 0;
    this.sentSize = "";
    this.errorMessage = "";
    this.setStatus(this.attempt > 0 ? "reconnecting" : "connecting");

    ws.onopen = () => {
      if (generation !== this.generation) return;
      this.lastFrameAt = Date.now();
      this.sendResize();
      this.pingTimer = setInterval(() => this.ping(), PING_MS);
    };
    ws.onmessage = (event) => {
      if (generation !== this.generation) return;
      this.lastFrameAt = Date.now();
      if (typeof event.data === "string") this.handleControl(event.data);
      else this.handleOutput(event.data, generation);
    };
    ws.onclose = (event) => {
      if (generation !== this.generation) return;
      this.ws = null;
      this.stopTimers();
      this.handleClose(event.code);
    };
  }

  handleControl(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      return;
    }
    switch (msg.type) {
      case "hello":
        this.attempt = 0;
        this.signedOutRetried = false;
        if (msg.state) this.session.state = msg.state;
        if (msg.mode) this.session.mode = msg.mode;
        if (msg.readOnly && !this.readOnly) {
          this.readOnly = true;
          this.term.options.disableStdin = true;
        }
        this.followSize(msg); // a viewer: the owner's size now (it may have changed meanwhile)
        if (msg.pruned || this.offset === null || !Number.isInteger(msg.offset)) {
          // The server cannot continue where this view stopped: take its replay instead.
          // Reset in stream order, so output still queued from a previous connection is
          // wiped too and the replay that follows repaints the screen exactly once.
          this.term.write("", () => this.term.reset());
        }
        // Otherwise the server continues at our offset — or before it, when it lost output
        // this view already shows (a crash before storing it): keep the screen either way.
        this.offset = Number.isInteger(msg.offset) ? msg.offset : null;
        if (msg.state === "exited" || msg.state === "killed") {
          this.ended = true;
          this.setStatus("exited");
        } else {
          this.ended = false;
          this.exitCode = null;
          this.setStatus("connected");
        }
        break;
      case "exit":
        this.ended = true;
        this.exitCode = msg.exitCode ?? null;
        this.revivable = Boolean(msg.revivable);
        if (msg.cwd) this.session.cwd = msg.cwd;
        this.session.state = msg.state || "exited";
        this.session.exitCode = this.exitCode;
        this.writeExitNotice();
        this.setStatus("exited");
        break;
      case "size":
        this.followSize(msg);
        break;
      case "cwd":
        if (typeof msg.cwd === "string") {
          this.session.cwd = msg.cwd;
          this.onChange(this);
        }
        break;
      case "title":
        this.session.title = msg.title;
        this.onChange(this);
        break;
      case "mode":
        if (msg.mode) this.session.mode = msg.mode;
        break;
      case "error":
        if (msg.code === "input_overflow") {
          this.noteOverflow(msg);
          break;
        }
        // A refusal is an error frame followed by a close: report it once, with the close.
        this.serverError = msg.message || msg.code || "terminal error";
        clearTimeout(this.errorTimer);
        this.errorTimer = setTimeout(() => this.reportServerError(), ERROR_GRACE_MS);
        break;
      case "info":
        // e.g. storage_recovered: the database answers again after an outage.
        if (msg.message) toast(msg.message, "info");
        break;
      default:
        break; // pong, and anything newer than this page
    }
  }

  /**
   * Count one refused input frame (the program is not reading its input) and report them all
   * in one notice once they stop coming: a big paste is refused in many frames.
   */
  noteOverflow({ message = "", bytes }) {
    const size = /(\d+) bytes were not delivered/.exec(message); // from servers before `bytes`
    this.overflowBytes += Number.isInteger(bytes) ? bytes : size ? Number(size[1]) : 0;
    this.overflowCount += 1;
    this.overflowMessage = message;
    clearTimeout(this.overflowTimer);
    this.overflowTimer = setTimeout(() => this.reportOverflow(), OVERFLOW_GRACE_MS);
  }

  reportOverflow() {
    clearTimeout(this.overflowTimer);
    this.overflowTimer = null;
    const { overflowBytes: bytes, overflowCount: count, overflowMessage: message } = this;
    this.overflowBytes = 0;
    this.overflowCount = 0;
    this.overflowMessage = "";
    if (!count) return;
    let text = message;
    if (count > 1) {
      const total = `${bytes} bytes in all were not delivered`;
      text = bytes
        ? message.replace(/\d+ bytes were not delivered/, total)
        : `${message} (${count} times)`;
    }
    toast(`${this.session.tabName}: ${text || "input was not delivered"}`);
  }

  writeExitNotice() {
    // Dim notice, and hide the cursor: nothing typed here goes anywhere now.
    if (this.revivable) {
      const where = this.session.cwd ? ` in ${this.session.cwd}` : "";
      this.term.write(
        `\r\n\x1b[2m── history restored · the server restarted and this shell ended ──\x1b[0m` +
          `\r\n\x1b[1mPress Enter to start a new shell${where}.\x1b[0m\r\n\x1b[?25l`,
      );
      return;
    }
    this.term.write(`\r\n\x1b[2m[${this.describeExit()}]\x1b[0m\r\n\x1b[?25l`);
  }

  /** Start a new shell in this tab (same session, its last directory), history kept above. */
  async revive() {
    if (this.reviving) return;
    this.reviving = true;
    try {
      const body = await api("POST", `/api/terminal/${encodeURIComponent(this.session.id)}/revive`, {
        cols: this.term.cols,
        rows: this.term.rows,
      });
      this.session = { ...this.session, ...body.session };
      this.ended = false;
      this.revivable = false;
      this.exitCode = null;
      this.offset = null; // replay from the start: the history, the line, the new prompt
      this.attempt = 0;
      this.connect();
    } catch (err) {
      const state = err instanceof ApiError && err.status === 409 ? err.details?.state : null;
      if (LIVE_STATES.has(state)) this.followRevival({ state });
      else toast(`${this.session.tabName}: ${err.message}`);
    } finally {
      this.reviving = false;
    }
  }

  /**
   * The session has a new shell, started from another window: attach to it, continuing after
   * the output this view already shows. Connects now if the view is on screen, else when shown.
   */
  followRevival(session = {}) {
    if (this.disposed || !this.ended || !this.revivable) return;
    this.session = { ...this.session, ...session, endReason: "", exitCode: null };
    this.ended = false;
    this.revivable = false;
    this.exitCode = null;
    this.attempt = 0;
    this.term.write("\x1b[?25h"); // the exit notice hid the cursor
    if (this.pane.classList.contains("active")) this.connect();
    else this.setStatus("idle");
  }

  handleOutput(buffer, generation) {
    const bytes = new Uint8Array(buffer);
    const n = bytes.length;
    if (this.offset !== null) this.offset += n;
    this.term.write(bytes, () => {
      if (generation !== this.generation) return;
      this.ackPending += n;
      if (this.ackPending >= ACK_BYTES) this.flushAck();
      else if (this.ackTimer === null) this.ackTimer = setTimeout(() => this.flushAck(), ACK_IDLE_MS);
    });
  }

  flushAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.ackPending > 0 && this.sendJson({ type: "ack", bytes: this.ackPending })) {
      this.ackPending = 0;
    }
  }

  reportServerError(fallback = "") {
    clearTimeout(this.errorTimer);
    this.errorTimer = null;
    const message = this.serverError || fallback;
    this.serverError = "";
    if (message) toast(`${this.session.tabName}: ${message}`);
    return message;
  }

  handleClose(code) {
    if (this.disposed) return;
    if (code === 4401) {
      this.serverError = "";
      this.handleSignedOut();
      return;
    }
    if (code in FINAL_CLOSE) {
      this.fail(this.reportServerError(FINAL_CLOSE[code]));
      return;
    }
    if (this.ended) {
      this.setStatus("exited");
      return;
    }
    let minDelay = 0;
    if (code === 4413) this.reportServerError("input too large; the connection was reset.");
    else this.reportServerError();
    if (code === 4429) minDelay = THROTTLED_MIN_MS;
    this.scheduleReconnect(minDelay);
  }

  /**
   * The server closed the socket as signed out. If the page's cookie is still a login (its key
   * was changed: a password change in another tab), connect again, once until a hello;
   * otherwise go to the login page.
   */
  async handleSignedOut() {
    if (!this.signedOutRetried) this.setStatus("reconnecting");
    const retry = !this.signedOutRetried && (await stillSignedIn());
    if (this.disposed) return;
    if (retry) {
      this.signedOutRetried = true;
      this.connect();
      return;
    }
    this.fail("Signed out.");
    redirectToLogin();
  }

  scheduleReconnect(minDelay = 0) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** this.attempt);
    this.attempt += 1;
    const delay = Math.max(minDelay, base / 2 + Math.random() * (base / 2));
    this.setStatus("reconnecting");
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delay);
  }

  ping() {
    if (Date.now() - this.lastFrameAt > STALE_MS) {
      // A silently dead connection (sleep, NAT timeout) may never fire close.
      this.dropSocket();
      this.scheduleReconnect();
      return;
    }
    this.sendJson({ type: "ping" });
  }

  sendInput(bytes) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || this.ended || this.readOnly) return;
    for (let i = 0; i < bytes.length; i += MAX_FRAME) {
      this.ws.send(bytes.subarray(i, i + MAX_FRAME));
    }
  }

  sendResize() {
    if (this.readOnly) return; // a viewer's window does not size the owner's terminal
    const { cols, rows } = this.term;
    const size = `${cols}x${rows}`;
    if (size === this.sentSize) return;
    if (this.sendJson({ type: "resize", cols, rows })) this.sentSize = size;
  }

  sendJson(message) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  describeExit() {
    if (this.session.state === "killed") return "terminal closed";
    return this.exitCode === null ? "process exited" : `process exited with code ${this.exitCode}`;
  }

  /** Text for the status indicator. */
  statusText() {
    switch (this.status) {
      case "connected":
        return this.readOnly ? "connected · read-only" : "connected";
      case "connecting":
        return "connecting…";
      case "reconnecting":
        return "reconnecting…";
      case "exited":
        if (this.session.state === "killed") return "killed";
        if (this.revivable) return "exited (server restarted) · Enter restarts";
        return this.exitCode === null ? "exited" : `exited (code ${this.exitCode})`;
      case "error":
        return this.errorMessage || "disconnected";
      default:
        return "";
    }
  }

  fail(message) {
    this.errorMessage = message;
    this.setStatus("error");
  }

  setStatus(status) {
    this.status = status;
    this.onChange(this);
  }

  clearRetry() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  stopTimers() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
  }

  /** Forget the current socket without reacting to its close. */
  dropSocket() {
    this.stopTimers();
    if (!this.ws) return;
    this.generation += 1;
    const ws = this.ws;
    this.ws = null;
    try {
      ws.close(1000);
    } catch (err) {
      // Already closing.
    }
  }

  /** Close the connection but keep the screen; showing the tab again continues from `offset`. */
  suspend() {
    if (this.disposed || !this.isLive) return;
    this.clearRetry();
    this.dropSocket();
    this.attempt = 0;
    this.setStatus(this.ended ? "exited" : "idle");
  }

  /** Close the connection and free the terminal; the server-side session keeps running. */
  dispose() {
    if (this.disposed) return;
    this.disposed = true;
    this.clearRetry();
    clearTimeout(this.errorTimer);
    clearTimeout(this.overflowTimer);
    this.dropSocket();
    this.term.dispose();
    this.pane.remove();
  }
}
