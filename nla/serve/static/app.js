// nla explorer: plain JavaScript, no build step and no CDN (the machine may be offline).
"use strict";

const $ = (id) => document.getElementById(id);
let lastResult = null;   // what "Copy as JSON" copies
let tokenRequest = 0;    // so a slow answer for an old text never overwrites a newer one

function apiKey() {
  return $("api-key").value.trim();
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setResult(data) {
  lastResult = data;
  $("json-view").textContent = JSON.stringify(data, null, 2);
  $("copy-json").disabled = false;
}

// Every call goes through here: the server's 4xx body {"error", "detail"} becomes the message shown.
async function api(path, body, contentType = "application/json") {
  const headers = { "Content-Type": contentType };
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  const init = body === undefined ? { headers } : {
    method: "POST", headers, body: contentType === "application/json" ? JSON.stringify(body) : body,
  };
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { /* non-JSON answer: reported below */ }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    throw new Error(`${response.status} ${data && data.error ? data.error : "error"}: ${detail}`);
  }
  return data;
}

function intOrNull(id) {
  const v = parseInt($(id).value, 10);
  return Number.isFinite(v) ? v : null;
}

function genOptions(nId) {
  const opts = { n: intOrNull(nId) || 1 };
  const mnt = intOrNull("max-new-tokens");
  if (mnt !== null) opts.max_new_tokens = mnt;
  return opts;
}

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "n/a";
}

function explanationText(sample) {
  return sample.explanation !== null ? sample.explanation : "(unparseable) " + sample.raw;
}

async function loadInfo() {
  try {
    const health = await api("/healthz");
    $("key-box").hidden = !health.auth_required;
    if (health.auth_required && !apiKey()) {
      $("model-info").textContent = "this server needs an API key";
      return;
    }
    const info = await api("/v1/info");
    const b = info.bundle;
    $("model-info").textContent =
      `${b.base_model} · layer ${b.layer_index} of ${b.n_layers} · d=${b.d_model}` +
      (info.has_mean_vector ? "" : " · no mean vector (FVE unavailable)");
    if (!info.search_dataset) {
      $("search-note").textContent = "No dataset to search: start the server with --data DATASET.";
      $("search").disabled = true;
    }
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

// The text box holds plain text, or with "chat transcript" ticked a JSON list of messages that
// the server renders with the model's chat template.
function textBody() {
  if (!$("chat-mode").checked) return { text: $("text").value };
  let messages;
  try { messages = JSON.parse($("text").value); } catch (err) {
    throw new Error("chat transcript: not valid JSON (" + err.message + ")");
  }
  return { messages };
}

async function tokenize() {
  const mine = ++tokenRequest;
  $("status").textContent = "tokenizing…";
  $("detail").hidden = true;
  try {
    const data = await api("/v1/explain", { ...textBody(), positions: [] });
    if (mine !== tokenRequest) return;
    renderTokens(data.tokens);
    setResult(data);
    showError("");
    $("status").textContent = `${data.tokens.length} tokens — click one to explain it`;
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  }
}

function renderTokens(tokens) {
  const box = $("tokens");
  box.replaceChildren();
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = t.text === "" ? "∅" : t.text.replace(/\n/g, "↵");
    if (/^<.*>$/.test(t.text)) span.classList.add("special");
    span.dataset.position = String(t.position);
    span.title = `position ${t.position}, id ${t.id}` + (t.role ? `, ${t.role} (${t.part})` : "");
    if (t.role) {
      span.dataset.role = t.role;
      span.classList.add("role-" + t.role.replace(/[^a-z0-9_-]/gi, ""));
      if (t.part === "template") span.classList.add("template");
    }
    span.addEventListener("click", () => explainPosition(t.position));
    box.appendChild(span);
  }
}

async function explainPosition(position) {
  document.querySelectorAll(".token.selected").forEach((el) => el.classList.remove("selected"));
  const chip = document.querySelector(`.token[data-position="${position}"]`);
  if (chip) chip.classList.add("selected");
  const mine = ++tokenRequest;
  $("status").textContent = `explaining position ${position}…`;
  $("detail").dataset.state = "loading";
  try {
    const data = await api("/v1/explain", {
      ...textBody(), positions: [position], ...genOptions("n"), causal: $("causal").checked,
    });
    if (mine !== tokenRequest) return;
    renderDetail(data.results[0]);
    setResult(data.results[0]);
    showError("");
    $("status").textContent = "";
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  }
}

function renderDetail(r) {
  $("d-position").textContent = String(r.position);
  $("d-token").textContent = r.token;
  const expl = $("explanation");
  expl.textContent = explanationText(r);
  expl.classList.toggle("unparseable", r.explanation === null);
  $("fve").textContent = r.fve_nrm !== null && r.fve_nrm !== undefined ? `FVE ${fmt(r.fve_nrm)}` : "FVE n/a";
  $("mse").textContent = `mse_nrm ${fmt(r.mse_nrm)} · cosine ${fmt(r.cosine)}`;
  // The causal check: the reconstruction patched back at layer K, against the mean μ.
  const c = r.causal;
  $("causal-label").hidden = $("causal-result").hidden = !c;
  if (c) {
    const frac = typeof c.fraction_recovered === "number" ? `${(100 * c.fraction_recovered).toFixed(1)} % of the KL recovered` : "μ changes nothing here";
    $("causal-result").textContent = `KL ${fmt(c.kl_reconstruction, 4)} vs μ ${fmt(c.kl_mean_ablation, 4)} nats · ${frac}`;
  }
  // Highlight the token itself at the end of its context, as the teacher saw it.
  const ctx = $("context");
  ctx.replaceChildren();
  const tail = r.context.endsWith(r.token) && r.token ? r.token : "";
  ctx.append(document.createTextNode(r.context.slice(0, r.context.length - tail.length)));
  if (tail) {
    const mark = document.createElement("mark");
    mark.textContent = tail;
    ctx.append(mark);
  }
  const list = $("samples");
  list.replaceChildren();
  if (r.samples.length > 1) {
    for (const s of r.samples) {
      const li = document.createElement("li");
      li.textContent = `${explanationText(s)}  (FVE ${fmt(s.fve_nrm)}, mse_nrm ${fmt(s.mse_nrm)})`;
      list.append(li);
    }
  }
  $("detail").hidden = false;
  $("detail").dataset.state = "done";
}

// Vectors from the panel: pasted JSON, a .json file (parsed here), or .npy / .safetensors
// bytes that the server parses (no pickles, no code paths beyond the array readers).
async function readVectors() {
  const file = $("vector-file").files[0];
  if (file) {
    const name = file.name.toLowerCase();
    if (name.endsWith(".json")) return parseJsonVectors(await file.text());
    const format = name.endsWith(".npy") ? "npy" : name.endsWith(".safetensors") ? "safetensors" : null;
    if (!format) throw new Error("choose a .json, .npy or .safetensors file");
    const parsed = await api(`/v1/vectors/parse?format=${format}`, await file.arrayBuffer(), "application/octet-stream");
    return parsed.vectors;
  }
  return parseJsonVectors($("vector-text").value);
}

function parseJsonVectors(text) {
  if (!text.trim()) throw new Error("paste a vector as JSON or choose a file");
  let value;
  try { value = JSON.parse(text); } catch (err) { throw new Error("vector is not valid JSON: " + err.message); }
  if (value && !Array.isArray(value) && Array.isArray(value.vectors)) value = value.vectors;
  if (!Array.isArray(value)) throw new Error("vector JSON must be a list of numbers or a list of lists");
  return value;
}

async function verbalize() {
  const list = $("vector-results");
  list.replaceChildren();
  try {
    const vectors = await readVectors();
    const data = await api("/v1/verbalize", {
      vectors, n: intOrNull("vector-n") || 1, round_trip: $("vector-round-trip").checked,
      ...(intOrNull("max-new-tokens") !== null ? { max_new_tokens: intOrNull("max-new-tokens") } : {}),
    });
    for (const r of data.results) {
      for (const s of r.samples) {
        const li = document.createElement("li");
        li.className = "vector-result";
        const metrics = s.mse_nrm !== null && s.mse_nrm !== undefined
          ? `  (mse_nrm ${fmt(s.mse_nrm)}, cosine ${fmt(s.cosine)})` : "";
        li.textContent = `[${r.index}] ${explanationText(s)}${metrics}`;
        list.append(li);
      }
    }
    setResult(data);
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

function tail(text, n) {
  const t = (text || "").replace(/\s+/g, " ");
  return t.length <= n ? t : "…" + t.slice(t.length - n + 1);
}

async function search() {
  const list = $("search-results");
  list.replaceChildren();
  try {
    const data = await api("/v1/search", {
      text: $("search-text").value, k: intOrNull("search-k") || 10, explain: $("search-explain").checked,
    });
    for (const h of data.hits) {
      const li = document.createElement("li");
      li.className = "search-hit";
      li.dataset.row = h.row;
      const head = document.createElement("div");
      head.textContent = `score ${fmt(h.score)} · cos ${fmt(h.cosine)} · ${h.doc_id}@${h.position}`;
      const ctx = document.createElement("pre");
      ctx.className = "hit-context";
      ctx.textContent = tail(h.context, 160);
      li.append(head, ctx);
      for (const [label, value, cls] of [["teacher", h.teacher_label, "hit-teacher"], ["AV", h.av_explanation, "hit-av"]]) {
        if (value === null || value === undefined) continue;
        const d = document.createElement("div");
        d.className = cls;
        d.textContent = `${label}: ${value}`;
        li.append(d);
      }
      list.append(li);
    }
    setResult(data);
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

async function copyJson() {
  const text = JSON.stringify(lastResult, null, 2);
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // No clipboard API (non-secure origin): copy through a selected textarea instead.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy-status").textContent = "copied";
  setTimeout(() => { $("copy-status").textContent = ""; }, 1500);
}

$("tokenize").addEventListener("click", tokenize);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) tokenize(); });
$("verbalize").addEventListener("click", verbalize);
$("copy-json").addEventListener("click", copyJson);
$("search").addEventListener("click", search);
$("search-text").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
$("api-key").addEventListener("change", loadInfo);
loadInfo();
