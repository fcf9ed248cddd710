// Shared by the page and the dashboard: the API key (session storage only), calls to the API
// with the key in a header, and errors in plain words.

const KEY_STORAGE = "imgsvc.apiKey";

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(message, status, code, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

const STATUS_WORDS = {
  401: "The API key was not accepted.",
  402: "The account does not have enough credits.",
  403: "This key may not do that.",
  404: "Not found.",
  409: "Not ready yet.",
  413: "The upload is too large.",
  415: "That file is not an image the service can read.",
  422: "The request was refused.",
  429: "Too many requests: wait a moment and retry.",
  503: "The service is busy or missing a model: retry later.",
};

/** An ApiError from a failed response: the JSON error body's message, in plain words. */
async function errorFrom(response) {
  let message = "";
  let code = `http_${response.status}`;
  let requestId = response.headers.get("X-Request-Id") || "";
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || "";
      code = body.error.code || code;
      requestId = body.error.request_id || requestId;
    }
  } catch {
    // not JSON: fall back to the status's words
  }
  const words = STATUS_WORDS[response.status] || `The service answered ${response.status}.`;
  let text = message ? `${words} ${capitalize(message)}` : words;
  if (!/[.!?]$/.test(text)) text += ".";
  const retry = response.headers.get("Retry-After");
  if (retry && (response.status === 429 || response.status === 503)) {
    text += ` Retry in ${retry} s.`;
  }
  return new ApiError(text, response.status, code, requestId);
}

function capitalize(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/**
 * fetch() with the key in the Authorization header (never in the URL). Resolves to the
 * Response when it is a 2xx; throws ApiError otherwise.
 */
export async function api(path, { method = "GET", body, headers = {}, key = getKey() } = {}) {
  const sent = new Headers(headers);
  if (key) sent.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, {
      method,
      body,
      headers: sent,
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError("Could not reach the service. Check the connection and retry.", 0, "network");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function apiJson(path, options) {
  const response = await api(path, options);
  return response.json();
}

/** A random Idempotency-Key (crypto.getRandomValues works on plain http too). */
export function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function credits(n) {
  const value = Number(n);
  return `${value.toLocaleString("en")} credit${value === 1 ? "" : "s"}`;
}

export function showError(element, error) {
  if (!error) {
    element.hidden = true;
    element.textContent = "";
    return;
  }
  element.textContent = "";
  const text = document.createElement("span");
  text.textContent = error.message || String(error);
  element.append(text);
  if (error.requestId) {
    const ref = document.createElement("small");
    ref.textContent = ` (request ${error.requestId})`;
    element.append(ref);
  }
  element.hidden = false;
}

/** Save a Blob as a file, through a temporary link (the key never enters a URL). */
export function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/**
 * The key form shared by both pages. `onAccount(account)` runs once the key is accepted
 * (at once when this tab already holds a key), `onForget()` when it is forgotten.
 */
export function setupKeyForm({ onAccount, onForget }) {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const status = document.getElementById("key-status");
  const forget = document.getElementById("key-forget");

  async function check(key) {
    status.textContent = "Checking the key…";
    status.className = "status";
    try {
      const account = await apiJson("/v1/account", { key });
      storeKey(key);
      input.value = "";
      input.placeholder = `${account.key_prefix}… (in use)`;
      status.textContent = `Key accepted: ${account.name}, ${credits(account.credits)} left.`;
      status.className = "status ok";
      forget.hidden = false;
      onAccount(account);
    } catch (error) {
      status.textContent = error.message;
      status.className = "status bad";
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      status.textContent = "Enter an API key first.";
      status.className = "status bad";
      input.focus();
      return;
    }
    check(key);
  });

  forget.addEventListener("click", () => {
    forgetKey();
    input.placeholder = "isk_…";
    status.textContent = "Key forgotten in this tab.";
    status.className = "status";
    forget.hidden = true;
    onForget();
    input.focus();
  });

  forget.hidden = !getKey();
  if (getKey()) check(getKey());
}
