// SigLIP 2 playground: calls this server's own API (same origin) and shows the answer and the curl command.
"use strict";

const $ = (id) => document.getElementById(id);
// Relative to the page (/playground), so the API is found under the same path prefix as the page.
const api = (path) => new URL(path, document.baseURI).href;
const SHOWN_BODY_CHARS = 2000;  // longer bodies (base64 images) are shortened on screen, never in what is copied
const FIRST_VALUES = 8;

const images = [];  // {name, value, detail}: value is a data URI or a URL, sent as it is
let busy = false;
let lastBlobUrl = null;
let fullCommand = "";

// ---------------------------------------------------------------------------------------------------------
// readiness
// ---------------------------------------------------------------------------------------------------------
let watching = false;

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

async function watchReady() {
  if (watching) return;
  watching = true;
  try {
    for (;;) {
      try {
        const resp = await fetch(api("readyz"), {cache: "no-store"});
        if (resp.ok) {
          setStatus("ready", "Ready: the model is loaded.");
          await describeModel();
          return;
        }
        setStatus("loading", `The model is still loading (/readyz answered ${resp.status}); checking again…`);
      } catch (err) {
        setStatus("down", "The server does not answer; checking again…");
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  } finally {
    watching = false;
  }
}

// What is served (GET /info, open like /readyz), so a user knows which member of the family answers; where it
// cannot be read the status just stays "Ready".
async function describeModel() {
  try {
    const resp = await fetch(api("info"), {cache: "no-store"});
    if (!resp.ok) return;
    const info = await resp.json();
    const shape = info.naflex ? `NaFlex, up to ${info.max_num_patches} patches per image`
      : `${info.image_width}x${info.image_height} images`;
    setStatus("ready", `Ready: ${info.model} (${info.family}, ${shape}, ${info.embed_dim}-dim embeddings) ` +
      `on ${info.device}, ${info.backend} ${info.dtype}.`);
  } catch (err) {
    // the status stays "Ready"
  }
}

// ---------------------------------------------------------------------------------------------------------
// images: file picker, drop, paste, URL
// ---------------------------------------------------------------------------------------------------------
function fmtBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files, how) {
  for (const file of files) {
    const value = await readAsDataUrl(file);
    images.push({name: file.name || `${how} image`, value, detail: `${fmtBytes(file.size)}, ${how}`});
  }
  renderImages();
}

function renderImages() {
  const list = $("images");
  list.replaceChildren();
  images.forEach((img, i) => {
    const item = document.createElement("li");
    if (img.value.startsWith("data:")) {
      const thumb = document.createElement("img");
      thumb.src = img.value;
      thumb.alt = "";
      item.append(thumb);
    }
    const text = document.createElement("span");
    text.className = "name";
    text.textContent = `${img.name} (${img.detail})`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove image ${i + 1}: ${img.name}`);
    remove.addEventListener("click", () => {
      images.splice(i, 1);
      renderImages();
    });
    item.append(text, remove);
    list.append(item);
  });
  $("clear-images").hidden = images.length === 0;
}

function imageFiles(dataTransfer) {
  return Array.from(dataTransfer ? dataTransfer.files : []);
}

// ---------------------------------------------------------------------------------------------------------
// calling the API
// ---------------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return $("token").value.trim();
}

async function post(path, body) {
  const text = JSON.stringify(body);
  showCurl(path, body, text);
  const headers = {"Content-Type": "application/json"};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let resp;
  try {
    resp = await fetch(api(path), {method: "POST", headers, body: text, cache: "no-store"});
  } catch (err) {
    throw new ApiError(0, `The server could not be reached (${err.message}).`);
  }
  const raw = await resp.text();
  let data;
  try {
    data = JSON.parse(raw);
  } catch (err) {
    data = undefined;
  }
  if (!resp.ok) {
    const message = data && typeof data.error === "string" ? data.error : raw.slice(0, 2000);
    throw new ApiError(resp.status, message);
  }
  return data;
}

async function run(action) {
  if (busy) return;
  busy = true;
  $("output").dataset.state = "busy";
  $("output").setAttribute("aria-busy", "true");
  $("error").hidden = true;
  $("placeholder").hidden = true;
  $("result").replaceChildren(note("Working…"));
  try {
    await action();
    $("output").dataset.state = "done";
  } catch (err) {
    $("result").replaceChildren();
    showError(err);
    $("output").dataset.state = "error";
  } finally {
    busy = false;
    $("output").removeAttribute("aria-busy");
  }
}

function showError(err) {
  const status = err instanceof ApiError ? err.status : 0;
  $("error-status").textContent = status ? `The API answered ${status}:` : "Error:";
  $("error-message").textContent = err.message;
  const hints = {
    401: "Enter the server's token in the API token field (top right).",
    429: "The server is busy; try again in a moment.",
    503: "The model is not ready yet; this page checks /readyz and says when it is.",
  };
  $("error-hint").textContent = hints[status] || "";
  $("error").hidden = false;
  if (status === 503) watchReady();
}

function note(text) {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = text;
  return p;
}

function needImages() {
  if (images.length === 0) throw new Error("Add an image first (choose, drop or paste one, or give its URL).");
  return images.length === 1 ? images[0].value : images.map((img) => img.value);
}

function lines(id) {
  return $(id).value.split("\n").map((s) => s.trim()).filter((s) => s);
}

// ---------------------------------------------------------------------------------------------------------
// the four actions
// ---------------------------------------------------------------------------------------------------------
async function zeroShot() {
  const parameters = {candidate_labels: lines("labels")};
  const template = $("template").value;
  if (template !== "This is a photo of {}.") parameters.hypothesis_template = template;
  const fn = $("function").value;
  if (fn !== "softmax") parameters.function_to_apply = fn;
  const inputs = needImages();
  const answer = await post("zero_shot", {inputs, parameters});
  const perImage = typeof inputs === "string" ? [answer] : answer;
  const out = [];
  perImage.forEach((scores, i) => {
    const title = document.createElement("h3");
    title.textContent = imageTitle(i);
    out.push(title, bars(scores, fn));
  });
  $("result").replaceChildren(...out);
}

function bars(scores, fn) {
  const values = scores.map((s) => s.score);
  const lo = fn === "none" ? Math.min(...values) : 0;
  const hi = fn === "none" ? Math.max(...values) : 1;
  const list = document.createElement("ol");
  list.className = "bars";
  for (const {label, score} of scores) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    const share = hi > lo ? (score - lo) / (hi - lo) : 1;
    bar.style.width = `${Math.max(0, Math.min(1, share)) * 100}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = fmtNumber(score);
    item.append(name, track, value);
    list.append(item);
  }
  return list;
}

// Four decimals, or four significant digits for tiny values (sigmoid scores are often far below 0.0001).
function fmtNumber(x) {
  return x === 0 || Math.abs(x) >= 0.001 ? x.toFixed(4) : x.toExponential(3);
}

function imageTitle(i) {
  return `Image ${i + 1}: ${images[i] ? images[i].name : ""}`;
}

async function similarity() {
  const texts = lines("texts");
  const inputs = needImages();
  const answer = await post("similarity", {inputs: {images: [].concat(inputs), texts}});
  $("result").replaceChildren(heatMap(answer.similarity_scores, texts));
}

function heatMap(matrix, texts) {
  const flat = matrix.flat();
  const lo = Math.min(...flat);
  const hi = Math.max(...flat);
  const table = document.createElement("table");
  table.className = "heat";
  const caption = document.createElement("caption");
  caption.textContent = `Cosine similarity (image × text); colour from ${lo.toFixed(4)} (light) to ${hi.toFixed(4)} (dark)`;
  const head = document.createElement("tr");
  head.append(document.createElement("td"));
  for (const text of texts) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = text;
    head.append(th);
  }
  const thead = document.createElement("thead");
  thead.append(head);
  const tbody = document.createElement("tbody");
  matrix.forEach((row, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = imageTitle(i);
    tr.append(th);
    for (const value of row) {
      const td = document.createElement("td");
      const share = hi > lo ? (value - lo) / (hi - lo) : 0.5;
      td.style.backgroundColor = `hsl(215 70% ${92 - share * 57}%)`;
      td.style.color = share > 0.55 ? "#fff" : "#111";
      td.textContent = fmtNumber(value);
      tr.append(td);
    }
    tbody.append(tr);
  });
  table.append(caption, thead, tbody);
  return table;
}

async function textEmbedding() {
  const text = $("text").value;
  const answer = await post("text_embedding", {inputs: text});
  $("result").replaceChildren(...vectors([].concat(answer), [`Text: ${text}`]));
}

async function imageEmbedding() {
  const inputs = needImages();
  const answer = await post("image_embedding", {inputs: [].concat(inputs)});
  $("result").replaceChildren(...vectors(answer, images.map((_, i) => imageTitle(i))));
}

function vectors(items, titles) {
  return items.map(({embedding}, i) => {
    const box = document.createElement("div");
    box.className = "vector";
    const title = document.createElement("h3");
    title.textContent = titles[i];
    const norm = Math.sqrt(embedding.reduce((sum, x) => sum + x * x, 0));
    const facts = document.createElement("dl");
    const add = (term, value, cls) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.className = cls;
      dd.textContent = value;
      facts.append(dt, dd);
    };
    add("Dimensions", String(embedding.length), "dims");
    add("L2 norm", norm.toFixed(4), "norm");
    add(`First ${Math.min(FIRST_VALUES, embedding.length)} values`,
        embedding.slice(0, FIRST_VALUES).map(fmtNumber).join(", "), "first");
    box.append(title, facts);
    return box;
  });
}

// ---------------------------------------------------------------------------------------------------------
// the curl command: the body goes through stdin (a heredoc), so any image size works when pasted
// ---------------------------------------------------------------------------------------------------------
function shellQuote(s) {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function curlCommand(path, bodyText, source) {
  const parts = [`curl -sS ${shellQuote(api(path))}`, "-H 'Content-Type: application/json'"];
  // The token stays out of the command (screens, shell history): the shell fills it in.
  if (token()) parts.push('-H "Authorization: Bearer $SIGLIP_API_TOKEN"');
  parts.push(`--data-binary ${source}`);
  const command = parts.join(" \\\n  ");
  // JSON.stringify never writes a newline, so the body cannot contain the heredoc's end line.
  return source === "@-" ? `${command} <<'JSON'\n${bodyText}\nJSON` : command;
}

function shorten(body) {
  return JSON.stringify(body, (key, value) => (typeof value === "string" && value.length > 96
    ? `${value.slice(0, 48)}…[${value.length - 48} more characters]` : value));
}

function showCurl(path, body, bodyText) {
  fullCommand = curlCommand(path, bodyText, "@-");
  const long = bodyText.length > SHOWN_BODY_CHARS;
  $("curl").textContent = long ? curlCommand(path, shorten(body), "@-") : fullCommand;
  const tokenNote = token() ? " Set SIGLIP_API_TOKEN in your shell to the token first." : "";
  $("curl-note").textContent = long
    ? `The body is ${fmtBytes(bodyText.length)}: its long strings are shortened on screen, and ` +
      `"Copy the command" copies it whole (the body goes through stdin, so any size works).${tokenNote}`
    : `Paste it into a shell.${tokenNote}`;
  $("curl-file").textContent = curlCommand(path, "", "@body.json");
  $("curl-file-box").hidden = !long;
  if (lastBlobUrl) URL.revokeObjectURL(lastBlobUrl);
  lastBlobUrl = URL.createObjectURL(new Blob([bodyText], {type: "application/json"}));
  $("download").href = lastBlobUrl;
  $("copied").textContent = "";
  $("curl-box").hidden = false;
}

async function copyCommand() {
  try {
    await navigator.clipboard.writeText(fullCommand);
  } catch (err) {
    // No clipboard API (plain http to another host): copy through a selected, off-screen text area.
    const area = document.createElement("textarea");
    area.value = fullCommand;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copied").textContent = `Copied (${fmtBytes(fullCommand.length)}).`;
}

// ---------------------------------------------------------------------------------------------------------
// wiring
// ---------------------------------------------------------------------------------------------------------
function onSubmit(id, action) {
  $(id).addEventListener("submit", (event) => {
    event.preventDefault();
    run(action);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  // The token lives in its input field only: never stored, gone when the page is closed or reloaded.
  $("token-form").addEventListener("submit", (event) => event.preventDefault());

  $("file").addEventListener("change", async (event) => {
    await addFiles(Array.from(event.target.files), "file");
    event.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = imageFiles(event.dataTransfer);
    const url = event.dataTransfer.getData("text/uri-list").split("\n").find((s) => s && !s.startsWith("#"));
    if (files.length) addFiles(files, "dropped");
    else if (url) addUrl(url.trim());
  });
  document.addEventListener("paste", (event) => {
    const files = imageFiles(event.clipboardData).filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      addFiles(files, "pasted");
    }
  });
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("url").value.trim();
    if (url) addUrl(url);
    $("url").value = "";
  });
  $("clear-images").addEventListener("click", () => {
    images.length = 0;
    renderImages();
  });

  onSubmit("zero-shot-form", zeroShot);
  onSubmit("similarity-form", similarity);
  onSubmit("text-embedding-form", textEmbedding);
  $("image-embedding").addEventListener("click", () => run(imageEmbedding));
  $("copy").addEventListener("click", copyCommand);
  watchReady();
});

function addUrl(url) {
  images.push({name: url, value: url, detail: "URL"});
  renderImages();
}
