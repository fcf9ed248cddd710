// The usage dashboard: credits per day, per operation, per client reference and per sub-key,
// recent calls, and the calls as CSV (fetched with the key in a header, saved as a file).

import { ApiError, apiJson, api, credits, getKey, saveBlob, setupKeyForm, showError } from "./common.js";

const $ = (id) => document.getElementById(id);
const DAY_MS = 86_400_000;
const RECENT_ROWS = 50;
const COLORS = ["#0b5cad", "#e36209", "#116329", "#8250df", "#bf3989", "#57606a"];
const RESELLER_SCOPE = "keys:children";
const charts = {};
let account = null;

function since() {
  const period = $("period").value;
  if (period === "all") return null;
  const days = Number(period);
  const today = new Date();
  const start = Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate()) -
    (days - 1) * DAY_MS;
  return new Date(start).toISOString().slice(0, 10);
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) search.set(name, String(value));
  }
  return search.toString();
}

function summary(groupBy) {
  const start = since();
  return apiJson(`/v1/usage/summary?${query({ group_by: groupBy, since: start && `${start}T00:00:00Z` })}`);
}

/** Every day of the period, those without calls at 0. */
function daysOf(groups) {
  const byDay = new Map(groups.map((g) => [g.group, g]));
  const start = since() || (groups.length ? groups[0].group : null);
  if (!start) return [];
  const days = [];
  const end = new Date().toISOString().slice(0, 10);
  for (let t = Date.parse(`${start}T00:00:00Z`); ; t += DAY_MS) {
    const day = new Date(t).toISOString().slice(0, 10);
    days.push(byDay.get(day) || { group: day, calls: 0, credits: 0 });
    if (day >= end || days.length > 3660) break;
  }
  return days;
}

function drawBars(id, labels, values, label, oneColor = false) {
  if (charts[id]) charts[id].destroy();
  if (!window.Chart) return;
  charts[id] = new window.Chart($(id), {
    type: "bar",
    data: {
      labels,
      datasets: [{ label, data: values, backgroundColor: oneColor ? COLORS[0] : labels.map((_, i) => COLORS[i % COLORS.length]),
      }],
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      plugins: { legend: { display: false } },
      scales: { y: { beginAtZero: true, ticks: { precision: 0 } } },
    },
  });
}

function fillTable(id, head, rows) {
  const table = $(id);
  table.textContent = "";
  const thead = table.createTHead().insertRow();
  for (const [text, numeric] of head) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = text;
    if (numeric) th.className = "number";
    thead.append(th);
  }
  const body = table.createTBody();
  if (!rows.length) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = head.length;
    cell.textContent = "No calls in this period.";
    return;
  }
  for (const row of rows) {
    const tr = body.insertRow();
    row.forEach((value, i) => {
      const cell = tr.insertCell();
      cell.textContent = value === null || value === undefined ? "" : String(value);
      if (head[i][1]) cell.className = "number";
    });
  }
}

const GROUP_HEAD = (what) => [[what, false], ["Calls", true], ["Credits", true]];

function groupRows(groups, name = (g) => g) {
  return groups.map((g) => [name(g.group), g.calls, g.credits]);
}

/** The sub-keys of a reseller key (one with the keys:children scope), else null. */
async function loadSubKeys(scopes) {
  if (!scopes.includes(RESELLER_SCOPE)) return null;
  try {
    return await apiJson("/v1/keys");
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) return null;
    throw error;
  }
}

async function refresh() {
  showError($("error"), null);
  if (!getKey()) {
    $("usage-status").textContent = "Enter an API key to see its usage.";
    return;
  }
  $("usage-status").textContent = "Loading…";
  try {
    const start = since();
    account = await apiJson("/v1/account");
    const [byDay, byOperation, byClient, recent, subKeys] = await Promise.all([
      summary("day"),
      summary("operation"),
      summary("client_ref"),
      apiJson(`/v1/usage?${query({ limit: RECENT_ROWS, since: start && `${start}T00:00:00Z` })}`),
      loadSubKeys(account.scopes),
    ]);
    $("totals").hidden = false;
    $("total-balance").textContent = account.credits.toLocaleString("en");
    $("total-credits").textContent = byDay.total_credits.toLocaleString("en");
    $("total-calls").textContent = byDay.total_calls.toLocaleString("en");

    const days = daysOf(byDay.data);
    drawBars("chart-day", days.map((d) => d.group), days.map((d) => d.credits), "Credits", true);
    fillTable("table-day", GROUP_HEAD("Day"), groupRows(byDay.data));

    drawBars("chart-operation", byOperation.data.map((g) => g.group),
      byOperation.data.map((g) => g.credits), "Credits");
    fillTable("table-operation", GROUP_HEAD("Operation"), groupRows(byOperation.data));

    const clients = byClient.data.filter((g) => g.group !== "");
    $("clients-section").hidden = clients.length === 0;
    if (clients.length) {
      drawBars("chart-client", clients.map((g) => g.group), clients.map((g) => g.credits), "Credits");
      fillTable("table-client", GROUP_HEAD("Client reference"), groupRows(byClient.data,
        (g) => g || "(none)"));
    }

    $("subkeys-section").hidden = subKeys === null;
    if (subKeys !== null) await showSubKeys(subKeys);

    fillTable(
      "table-recent",
      [["Time (UTC)", false], ["Operation", false], ["Model", false], ["Size", false],
        ["Credits", true], ["Client reference", false], ["Request id", false]],
      recent.data.map((r) => [
        r.created_at.replace("T", " ").slice(0, 19),
        r.operation,
        r.model,
        `${r.input_width}×${r.input_height} → ${r.output_width}×${r.output_height}`,
        r.credits,
        r.client_ref,
        r.request_id,
      ]),
    );
    $("usage-status").textContent = `Updated ${new Date().toLocaleTimeString("en")}.`;
  } catch (error) {
    $("usage-status").textContent = "";
    showError($("error"), error);
  }
}

async function showSubKeys(subKeys) {
  const byKey = await summary("key");
  const names = new Map(subKeys.map((k) => [String(k.id), k.name]));
  names.set(String(account.id), `${account.name} (this key)`);
  const label = (id) => names.get(id) || `key ${id} (revoked)`;
  drawBars("chart-key", byKey.data.map((g) => label(g.group)), byKey.data.map((g) => g.credits), "Credits");
  const spent = new Map(byKey.data.map((g) => [g.group, g]));
  fillTable(
    "table-keys",
    [["Name", false], ["Key", false], ["Calls in period", true], ["Credits in period", true],
      ["Spent this month", true], ["Monthly cap", true]],
    subKeys.map((k) => {
      const used = spent.get(String(k.id)) || { calls: 0, credits: 0 };
      return [k.name, `${k.key_prefix}…`, used.calls, used.credits, k.month_spent,
        k.monthly_cap === null ? "none" : k.monthly_cap];
    }),
  );
}

async function exportCsv() {
  showError($("error"), null);
  if (!getKey()) {
    showError($("error"), { message: "Enter an API key first." });
    return;
  }
  try {
    const start = since();
    const response = await api(
      `/v1/usage?${query({ format: "csv", limit: 100000, since: start && `${start}T00:00:00Z` })}`,
    );
    const blob = await response.blob();
    const stamp = new Date().toISOString().slice(0, 10);
    saveBlob(new Blob([blob], { type: "text/csv" }), `imgsvc-usage-${start || "all"}-to-${stamp}.csv`);
    $("usage-status").textContent = "CSV saved.";
  } catch (error) {
    showError($("error"), error);
  }
}

function clear() {
  for (const id of Object.keys(charts)) {
    charts[id].destroy();
    delete charts[id];
  }
  $("totals").hidden = true;
  $("subkeys-section").hidden = true;
  $("clients-section").hidden = true;
  for (const id of ["table-day", "table-operation", "table-recent", "table-keys", "table-client"]) {
    $(id).textContent = "";
  }
  $("usage-status").textContent = "Enter an API key to see its usage.";
}

setupKeyForm({ onAccount: refresh, onForget: clear });
$("refresh").addEventListener("click", refresh);
$("period").addEventListener("change", refresh);
$("export-csv").addEventListener("click", exportCsv);
if (!getKey()) clear();
