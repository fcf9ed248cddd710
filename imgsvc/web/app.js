// The page: images in (drop, paste, choose), an operation and its options, the price before
// the call, the result with a before/after slider, or a batch job for many images.

import {
  api,
  apiJson,
  credits,
  getKey,
  newIdempotencyKey,
  setupKeyForm,
  showError,
} from "./common.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);
const ERASE_ENGINES = ["lama", "opencv-telea", "opencv-ns"];
const JOB_FINISHED = ["succeeded", "partially_failed", "failed", "canceled"];
const EXTENSIONS = { "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg", "application/zip": "zip" };
const POLL_MS = 1000;

const state = {
  files: [], // {file, url, width, height}
  resultUrl: null,
  jobZipUrl: null,
  jobId: null,
  busy: false,
  quoteSeq: 0,
};
const painter = new MaskPainter($("mask-canvas"), $("mask-image"));

// --- images in ---------------------------------------------------------------------------

function isImage(file) {
  return file && (file.type.startsWith("image/") || /\.(heic|heif|avif|tiff?)$/i.test(file.name));
}

async function dimensions(url) {
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
    return { width: img.naturalWidth, height: img.naturalHeight };
  } catch {
    return { width: 0, height: 0 }; // a format this browser cannot show (the service may)
  }
}

async function addFiles(list) {
  const files = Array.from(list || []).filter(isImage);
  if (!files.length) {
    showError($("error"), { message: "Those files are not images. Choose PNG, JPEG or WebP files." });
    return;
  }
  showError($("error"), null);
  for (const file of files) {
    const url = URL.createObjectURL(file);
    state.files.push({ file, url, ...(await dimensions(url)) });
  }
  renderFiles();
}

function removeFile(index) {
  URL.revokeObjectURL(state.files[index].url);
  state.files.splice(index, 1);
  renderFiles();
}

function renderFiles() {
  const list = $("file-list");
  list.textContent = "";
  state.files.forEach((entry, index) => {
    const item = document.createElement("li");
    const thumb = document.createElement("img");
    thumb.src = entry.url;
    thumb.alt = "";
    const name = document.createElement("span");
    name.className = "file-name";
    name.textContent = entry.file.name || "pasted image";
    const size = document.createElement("span");
    size.className = "file-size";
    size.textContent = entry.width ? `${entry.width} × ${entry.height}` : "size unknown";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary small";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${name.textContent}`);
    remove.addEventListener("click", () => removeFile(index));
    item.append(thumb, name, size, remove);
    list.append(item);
  });
  $("clear-files").hidden = state.files.length === 0;
  const first = state.files[0];
  painter.setImage(first ? first.url : null, first ? first.width : 0, first ? first.height : 0);
  $("mask-stage").hidden = !first;
  $("mask-empty").hidden = Boolean(first);
  updatePrice();
}

function setupInputs() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped beside the zone must not replace the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const files = Array.from((event.clipboardData && event.clipboardData.files) || []);
    if (files.some(isImage)) {
      event.preventDefault();
      addFiles(files);
    }
  });
  $("clear-files").addEventListener("click", () => {
    state.files.forEach((entry) => URL.revokeObjectURL(entry.url));
    state.files = [];
    renderFiles();
    $("file-input").focus();
  });
}

// --- operation and options -----------------------------------------------------------------

function operation() {
  return document.querySelector('input[name="operation"]:checked').value;
}

function radio(name) {
  return document.querySelector(`input[name="${name}"]:checked`).value;
}

function setupOptions() {
  for (const input of document.querySelectorAll('input[name="operation"]')) {
    input.addEventListener("change", showOptions);
  }
  for (const input of document.querySelectorAll('input[name="upscale-mode"]')) {
    input.addEventListener("change", () => {
      const target = radio("upscale-mode") === "target";
      $("upscale-scale-field").hidden = target;
      $("upscale-width-field").hidden = !target;
      $("upscale-height-field").hidden = !target;
      updatePrice();
    });
  }
  for (const input of document.querySelectorAll('input[name="inpaint-mode"]')) {
    input.addEventListener("change", () => {
      $("prompt-fields").hidden = radio("inpaint-mode") !== "prompt";
      fillInpaintEngines();
      updatePrice();
    });
  }
  const priced = ["bg-size", "up-scale", "up-width", "up-height", "ip-steps"];
  for (const id of priced) $(id).addEventListener("input", updatePrice);
  $("brush-size").addEventListener("input", () => {
    painter.brush = Number($("brush-size").value);
    $("brush-size-value").textContent = `${painter.brush} px`;
  });
  painter.brush = Number($("brush-size").value);
  $("mask-undo").addEventListener("click", () => painter.undo());
  $("mask-clear").addEventListener("click", () => painter.clear());
  showOptions();
}

function showOptions() {
  const op = operation();
  for (const name of ["remove-background", "upscale", "inpaint"]) {
    $(`options-${name}`).hidden = name !== op;
  }
  if (op === "inpaint") painter.redraw();
  updatePrice();
}

let models = [];

async function loadModels() {
  try {
    models = (await apiJson("/v1/models", { key: "" })).data || [];
  } catch {
    models = [];
  }
  const upscalers = models.filter((m) => m.operation === "upscale" && m.present);
  for (const m of upscalers) {
    const option = new Option(m.default ? `${m.name} (default)` : m.name, m.name);
    $("up-model").append(option);
  }
  fillInpaintEngines();
}

function fillInpaintEngines() {
  const select = $("ip-model");
  const prompt = radio("inpaint-mode") === "prompt";
  select.textContent = "";
  select.append(new Option("Automatic", ""));
  const rows = models.filter(
    (m) => m.operation === "inpaint" && m.present && ERASE_ENGINES.includes(m.name) !== prompt,
  );
  for (const m of rows) select.append(new Option(m.name, m.name));
}

/** The chosen operation's options as form fields (only those the user set). */
function optionFields() {
  const op = operation();
  const fields = {};
  if (op === "remove-background") {
    if ($("bg-preset").value) fields.preset = $("bg-preset").value;
    fields.size = $("bg-size").value;
    if ($("bg-color").value.trim()) fields.bg_color = $("bg-color").value.trim();
    if ($("bg-crop").checked) fields.crop = "true";
    if ($("bg-format").value) fields.format = $("bg-format").value;
  } else if (op === "upscale") {
    if (radio("upscale-mode") === "target") {
      if ($("up-width").value) fields.target_width = $("up-width").value;
      if ($("up-height").value) fields.target_height = $("up-height").value;
    } else {
      fields.scale = $("up-scale").value || "4";
    }
    if ($("up-model").value) fields.model = $("up-model").value;
    fields.format = $("up-format").value;
  } else {
    if (radio("inpaint-mode") === "prompt") {
      fields.prompt = $("ip-prompt").value;
      if ($("ip-steps").value) fields.steps = $("ip-steps").value;
      if ($("ip-seed").value) fields.seed = $("ip-seed").value;
    }
    if ($("ip-model").value) fields.model = $("ip-model").value;
  }
  return fields;
}

// --- price before the call -----------------------------------------------------------------

function quoteBody(entry) {
  const op = operation();
  const body = { operation: op, width: entry.width, height: entry.height };
  const fields = optionFields();
  if (op === "remove-background") body.size = fields.size;
  if (op === "upscale") {
    for (const name of ["scale", "target_width", "target_height"]) {
      if (fields[name] !== undefined) body[name] = Number(fields[name]);
    }
  }
  if (op === "inpaint") {
    body.prompt = radio("inpaint-mode") === "prompt";
    if (body.prompt && fields.steps) body.steps = Number(fields.steps);
  }
  return body;
}

let priceTimer = null;

function updatePrice() {
  clearTimeout(priceTimer);
  priceTimer = setTimeout(showPrice, 150);
}

async function showPrice() {
  const price = $("price");
  const seq = ++state.quoteSeq;
  const entries = operation() === "inpaint" ? state.files.slice(0, 1) : state.files;
  if (!getKey() || !entries.length) {
    price.textContent = "Enter a key and choose an image to see the price.";
    return;
  }
  if (entries.some((entry) => !entry.width)) {
    price.textContent = "The price is shown after the call (this browser cannot read the image's size).";
    return;
  }
  try {
    const cache = new Map();
    let total = 0;
    let exact = true;
    for (const entry of entries) {
      const body = JSON.stringify(quoteBody(entry));
      if (!cache.has(body)) {
        cache.set(body, apiJson("/v1/quote", {
          method: "POST",
          body,
          headers: { "Content-Type": "application/json" },
        }));
      }
      const quote = await cache.get(body);
      total += quote.credits;
      exact = exact && quote.exact;
    }
    if (seq !== state.quoteSeq) return;
    const what = entries.length === 1 ? "This call costs" : `These ${entries.length} images cost`;
    price.textContent = `${what} ${exact ? "" : "about "}${credits(total)}.`;
    price.dataset.credits = String(total);
  } catch (error) {
    if (seq !== state.quoteSeq) return;
    price.textContent = `No price: ${error.message}`;
    delete price.dataset.credits;
  }
}

// --- run ------------------------------------------------------------------------------------

function setBusy(busy, text = "") {
  state.busy = busy;
  $("run").disabled = busy;
  $("run").setAttribute("aria-busy", String(busy));
  $("run-status").textContent = text;
}

async function run() {
  showError($("error"), null);
  if (!getKey()) {
    showError($("error"), { message: "Enter your API key first (step 1)." });
    $("api-key").focus();
    return;
  }
  if (!state.files.length) {
    showError($("error"), { message: "Choose an image first (step 2)." });
    $("file-input").focus();
    return;
  }
  const op = operation();
  if (op === "inpaint" && painter.isEmpty()) {
    showError($("error"), { message: "Paint over the area to change first (the mask is empty)." });
    return;
  }
  try {
    if (state.files.length > 1 && op !== "inpaint") {
      await runJob(op);
    } else {
      await runOne(op, state.files[0]);
    }
  } catch (error) {
    setBusy(false);
    showError($("error"), error);
  }
}

async function runOne(op, entry) {
  setBusy(true, "Working…");
  $("job").hidden = true;
  const form = new FormData();
  form.append("image", entry.file, entry.file.name || "image.png");
  for (const [name, value] of Object.entries(optionFields())) form.append(name, value);
  if (op === "remove-background" && $("bg-image").files[0]) {
    form.append("bg_image", $("bg-image").files[0]);
  }
  if (op === "inpaint") form.append("mask", await painter.maskBlob(), "mask.png");
  const response = await api(`/v1/${op}`, {
    method: "POST",
    body: form,
    headers: { "Idempotency-Key": newIdempotencyKey() },
  });
  const blob = await response.blob();
  showResult(entry, blob, response.headers, op);
  setBusy(false, "Done.");
}

function showResult(entry, blob, headers, op) {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  const charged = headers.get("X-Credits-Charged");
  const remaining = headers.get("X-Credits-Remaining");
  const credited = $("credits");
  credited.textContent = `Charged ${credits(charged)}. ${credits(remaining)} left.`;
  credited.dataset.charged = charged;
  credited.dataset.remaining = remaining;
  const notes = [];
  if (headers.get("X-Model")) notes.push(`Model: ${headers.get("X-Model")}`);
  if (headers.get("X-Width")) notes.push(`${headers.get("X-Width")} × ${headers.get("X-Height")} px`);
  if (headers.get("X-Seed")) notes.push(`seed ${headers.get("X-Seed")}`);
  if (headers.get("X-Compliance")) notes.push(`marketplace check: ${headers.get("X-Compliance")}`);
  if (headers.get("X-Warning")) notes.push(`note: ${headers.get("X-Warning")}`);
  $("result-notes").textContent = notes.join(" · ");
  $("before").src = entry.url;
  $("after").src = state.resultUrl;
  const width = Number(headers.get("X-Width")) || entry.width || 4;
  const height = Number(headers.get("X-Height")) || entry.height || 3;
  $("compare").style.aspectRatio = `${width} / ${height}`;
  setComparison();
  const link = $("download");
  link.href = state.resultUrl;
  link.download = resultName(entry.file.name, op, blob.type);
  $("result").hidden = false;
}

function resultName(original, op, type) {
  const base = (original || "image").replace(/\.[^.]+$/, "");
  const suffix = { "remove-background": "cutout", upscale: "upscaled", inpaint: "inpainted" }[op];
  return `${base}-${suffix}.${EXTENSIONS[type] || "png"}`;
}

function setComparison() {
  const position = Number($("compare-range").value);
  // After on the right of the handle, before on its left.
  $("after-layer").style.clipPath = `inset(0 0 0 ${position}%)`;
  $("compare").style.setProperty("--split", `${position}%`);
}

// --- many images: a batch job ----------------------------------------------------------------

async function runJob(op) {
  setBusy(true, "Sending the images…");
  $("result").hidden = true;
  const form = new FormData();
  form.append("operation", op);
  for (const [name, value] of Object.entries(optionFields())) form.append(name, value);
  if (op === "remove-background" && $("bg-image").files[0]) {
    form.append("bg_image", $("bg-image").files[0]);
  }
  state.files.forEach((entry, index) => {
    form.append("files", entry.file, entry.file.name || `image-${index + 1}.png`);
  });
  const job = await apiJson("/v1/jobs", {
    method: "POST",
    body: form,
    headers: { "Idempotency-Key": newIdempotencyKey() },
  });
  state.jobId = job.id;
  if (state.jobZipUrl) URL.revokeObjectURL(state.jobZipUrl);
  state.jobZipUrl = null;
  $("job-download").hidden = true;
  $("job-cancel").hidden = false;
  $("job").hidden = false;
  renderJob(job);
  let current = job;
  while (!JOB_FINISHED.includes(current.status)) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    current = await apiJson(`/v1/jobs/${current.id}`);
    renderJob(current);
  }
  $("job-cancel").hidden = true;
  const account = await apiJson("/v1/account");
  const status = $("job-status");
  status.textContent += ` Charged ${credits(current.credits.charged)}. ${credits(account.credits)} left.`;
  status.dataset.charged = String(current.credits.charged);
  status.dataset.remaining = String(account.credits);
  if (current.progress.succeeded > 0) {
    const zip = await (await api(`/v1/jobs/${current.id}/result`)).blob();
    state.jobZipUrl = URL.createObjectURL(zip);
    const link = $("job-download");
    link.href = state.jobZipUrl;
    link.download = `${current.id}.zip`;
    link.hidden = false;
  }
  setBusy(false, "Done.");
}

const STATUS_WORDS = {
  queued: "waiting",
  running: "working",
  succeeded: "done",
  failed: "failed",
  canceled: "canceled",
  partially_failed: "finished, some images failed",
};

function renderJob(job) {
  const p = job.progress;
  const done = p.succeeded + p.failed + p.canceled;
  $("job-progress").max = p.total;
  $("job-progress").value = done;
  $("job-status").textContent = `Job ${job.id}: ${STATUS_WORDS[job.status] || job.status}, ` +
    `${done} of ${p.total} images finished.`;
  const body = $("job-items");
  body.textContent = "";
  for (const item of job.items || []) {
    const row = document.createElement("tr");
    const status = item.error ? `${STATUS_WORDS[item.status]}: ${item.error.message}` :
      STATUS_WORDS[item.status] || item.status;
    for (const text of [item.item, item.name, status, item.credits]) {
      const cell = document.createElement("td");
      cell.textContent = String(text);
      row.append(cell);
    }
    row.dataset.status = item.status;
    body.append(row);
  }
}

async function cancelJob() {
  if (!state.jobId) return;
  try {
    renderJob(await apiJson(`/v1/jobs/${state.jobId}`, { method: "DELETE" }));
  } catch (error) {
    showError($("error"), error);
  }
}

// --- start ---------------------------------------------------------------------------------

setupKeyForm({ onAccount: updatePrice, onForget: updatePrice });
setupInputs();
setupOptions();
loadModels();
$("run").addEventListener("click", run);
$("compare-range").addEventListener("input", setComparison);
$("job-cancel").addEventListener("click", cancelJob);
setComparison();
