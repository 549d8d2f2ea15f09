// HTTP API client and user-facing notifications for the workspace page.

const LOGIN_URL = document.body.dataset.loginUrl || "/accounts/login/";

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** Send the browser to the login page, coming back to the workspace afterwards. */
export function redirectToLogin() {
  window.location.assign(`${LOGIN_URL}?next=/`);
}

/**
 * Whether this page's cookie still holds a login. A terminal socket closed as signed out may
 * have had the login's old key: Django gives a login a new one when its password changes
 * (in another tab) or it signs in again, and the old key then ends.
 */
export async function stillSignedIn() {
  try {
    const response = await fetch("/api/projects", {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    return response.ok;
  } catch (err) {
    return false;
  }
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  if (match) return decodeURIComponent(match[1]);
  // The cookie may be renamed or HttpOnly; the logout form always carries a token.
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

function fallbackMessage(status) {
  if (status === 403) return "The server refused the request (403). Reload the page and try again.";
  if (status === 404) return "Not found (404).";
  if (status >= 500) return `The server had a problem (${status}). Try again in a moment.`;
  return `Request failed (${status}).`;
}

/**
 * Call the JSON API and return the parsed body; throw ApiError on any failure.
 * A 401 sends the user to the login page.
 */
export async function api(method, url, body) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  };
  if (method !== "GET" && method !== "HEAD") {
    init.headers["X-CSRFToken"] = csrfToken();
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body ?? {});
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, "network_error", "Cannot reach the server. Check your connection.");
  }
  if (response.status === 401) {
    redirectToLogin();
    throw new ApiError(401, "unauthenticated", "Your session has ended. Please sign in again.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok || !data || data.success === false) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || fallbackMessage(response.status),
      error.details,
    );
  }
  return data;
}

const TOAST_MS = 6000;

/** Show a short message in the corner; kind is "error" or "info". */
export function toast(message, kind = "error") {
  const host = document.getElementById("toasts");
  if (!host) return;
  const el = document.createElement("div");
  el.className = `toast toast-${kind}`;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  const text = document.createElement("span");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "toast-close";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => el.remove());
  el.append(text, close);
  host.append(el);
  while (host.children.length > 4) host.firstElementChild.remove();
  setTimeout(() => el.remove(), TOAST_MS);
}

/** Report an error from api() (or anything else) to the user. */
export function showError(err) {
  if (err instanceof ApiError && err.status === 401) return;
  toast(err && err.message ? err.message : String(err), "error");
}
