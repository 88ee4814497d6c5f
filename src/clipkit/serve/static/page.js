// The search page: POST /v1/search (or /v1/search/image), then one thumbnail per result.
// When the server wants an API key, the page asks for it once and trades it (POST /v1/session) for an HttpOnly
// cookie that every later request carries: the key is kept nowhere a script, this one included, can read it.
// A text search lives in the page's URL (?q=...&k=...), so it can be shared, bookmarked and reloaded.
"use strict";

const THUMBNAIL_SIZE = 256;

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function describeError(response) {
  if (response.status === 401) {
    document.getElementById("key-row").hidden = false;
    return "this server needs an API key";
  }
  try {
    const body = await response.json();
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return body.detail || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadThumbnail(img, id) {
  const response = await fetch("/v1/images/" + id + "?size=" + THUMBNAIL_SIZE);
  if (!response.ok) return;
  img.src = URL.createObjectURL(await response.blob());
  img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
}

function showResults(body) {
  const grid = document.getElementById("results");
  grid.replaceChildren();
  for (const result of body.results) {
    const figure = document.createElement("figure");
    figure.className = "result";
    figure.dataset.id = result.id;
    const img = document.createElement("img");
    img.alt = result.caption || result.uri;
    img.title = result.uri;
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    caption.append(score, " " + (result.caption || result.uri));  // text nodes: never parsed as HTML
    figure.append(img, caption);
    grid.append(figure);
    loadThumbnail(img, result.id);
  }
  setStatus(body.results.length + " results in " + body.took_ms.toFixed(1) + " ms", false);
}

async function run(request) {
  setStatus("searching...", false);
  try {
    const response = await request();
    if (!response.ok) {
      setStatus("error " + response.status + ": " + (await describeError(response)), true);
      return;
    }
    showResults(await response.json());
  } catch (e) {
    setStatus("the server did not answer (" + e.message + ")", true);
  }
}

function k() {
  return parseInt(document.getElementById("k").value, 10);
}

function searchText(query, count) {
  run(() => fetch("/v1/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query: query, k: count }),
  }));
}

function setK(count) {
  const select = document.getElementById("k");
  if (![...select.options].some((option) => option.value === String(count))) {
    select.append(new Option(String(count)));  // a k from a shared link that the list does not offer
  }
  select.value = String(count);
}

// The search the URL names, if any: fills the form and runs it (on load, and on back / forward).
function searchFromUrl() {
  const params = new URLSearchParams(location.search);
  const query = params.get("q") || "";
  if (!query.trim()) return;
  const count = parseInt(params.get("k"), 10);
  if (count >= 1 && count <= 1000) setK(count);
  document.getElementById("query").value = query;
  searchText(query, k());
}

document.getElementById("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = document.getElementById("query").value;
  const url = "?" + new URLSearchParams({ q: query, k: String(k()) }).toString();
  if (url === location.search) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  searchText(query, k());
});

window.addEventListener("popstate", searchFromUrl);
searchFromUrl();

document.getElementById("image-query").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k()));
  run(() => fetch("/v1/search/image", { method: "POST", body: form }));
});

document.getElementById("key-row").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  const response = await fetch("/v1/session", {
    method: "POST",
    headers: { Authorization: "Bearer " + input.value },
  });
  input.value = "";
  if (!response.ok) {
    setStatus("error " + response.status + ": " + (await describeError(response)), true);
    return;
  }
  document.getElementById("key-row").hidden = true;
  document.getElementById("search-form").requestSubmit();
});
