// The rating page: one blinded item at a time; every change is saved at once.
"use strict";

const state = { sheet: null, rater: "", index: 0, answers: {}, complete: new Set(), pending: 0 };
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.detail || res.statusText);
  return body;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

function itemAt(i) { return state.sheet.items[i]; }

function answerFor(item) {
  let a = state.answers[item.item_id];
  if (!a) {
    a = { item_id: item.item_id, scores: {}, comment: "" };
    for (const o of item.outputs) {
      a.scores[o.label] = {};
      for (const c of state.sheet.criteria) a.scores[o.label][c] = null;
    }
    state.answers[item.item_id] = a;
  }
  return a;
}

function updateProgress() {
  const total = state.sheet.items.length;
  const done = state.complete.size;
  $("progress").textContent = `${done} / ${total} complete`;
  $("progress-bar").max = total;
  $("progress-bar").value = done;
  $("position").textContent = `Item ${state.index + 1} of ${total}`;
  $("prev").disabled = state.index === 0;
  $("next").disabled = state.index >= total - 1;
}

function render() {
  const item = itemAt(state.index);
  const answer = answerFor(item);
  $("prompt").textContent = item.prompt;
  $("reference-wrap").hidden = !item.reference;
  $("reference").textContent = item.reference || "";
  const outs = $("outputs");
  outs.replaceChildren();
  const [lo, hi] = state.sheet.scale;
  for (const o of item.outputs) {
    const box = document.createElement("div");
    box.className = "output";
    box.id = `output-${o.label}`;
    const h = document.createElement("h3");
    h.textContent = `Answer ${o.label}`;
    const pre = document.createElement("pre");
    pre.textContent = o.text;
    box.append(h, pre);
    for (const c of state.sheet.criteria) {
      const row = document.createElement("div");
      row.className = "criterion";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = c;
      row.append(name);
      for (let v = lo; v <= hi; v++) {
        const id = `s-${o.label}-${c}-${v}`;
        const input = document.createElement("input");
        input.type = "radio";
        input.name = `s-${o.label}-${c}`;
        input.id = id;
        input.value = String(v);
        input.checked = answer.scores[o.label][c] === v;
        input.addEventListener("change", () => {
          answer.scores[o.label][c] = v;
          save(answer);
        });
        const lab = document.createElement("label");
        lab.htmlFor = id;
        lab.textContent = String(v);
        row.append(input, lab);
      }
      box.append(row);
    }
    outs.append(box);
  }
  $("comment").value = answer.comment || "";
  history.replaceState(null, "", `#${item.item_id}`);
  updateProgress();
}

let commentTimer = null;

async function save(answer) {
  state.pending += 1;
  $("status").textContent = "Saving…";
  try {
    const body = await api("/api/answers", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rater: state.rater, item_id: answer.item_id, scores: answer.scores, comment: answer.comment }),
    });
    state.complete = new Set(body.complete);
    state.pending -= 1;
    if (state.pending === 0) $("status").textContent = "Saved";
    showError("");
    updateProgress();
  } catch (err) {
    state.pending -= 1;
    $("status").textContent = "";
    showError(`Not saved: ${err.message}`);
  }
}

function go(i) {
  const total = state.sheet.items.length;
  state.index = Math.max(0, Math.min(total - 1, i));
  $("status").textContent = "";
  render();
}

function firstUnrated(from) {
  const items = state.sheet.items;
  for (let k = 0; k < items.length; k++) {
    const i = (from + k) % items.length;
    if (!state.complete.has(items[i].item_id)) return i;
  }
  return from;
}

async function start() {
  const name = $("rater").value.trim();
  if (!name) { showError("Enter your name first."); return; }
  state.rater = name;
  localStorage.setItem("tunesmith-rater", name);
  const mine = await api(`/api/answers?rater=${encodeURIComponent(name)}`);
  state.answers = mine.answers;
  state.complete = new Set(mine.complete);
  showError("");
  $("main").hidden = false;
  $("progress-wrap").hidden = false;
  const hash = location.hash.slice(1);
  const fromHash = state.sheet.items.findIndex((it) => it.item_id === hash);
  go(fromHash >= 0 && !state.complete.has(hash) ? fromHash : firstUnrated(0));
}

async function init() {
  try {
    state.sheet = await api("/api/sheet");
  } catch (err) {
    showError(`Cannot load the sheet: ${err.message}`);
    return;
  }
  document.title = `tunesmith · ${state.sheet.name}`;
  $("start").addEventListener("click", start);
  $("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
  $("prev").addEventListener("click", () => go(state.index - 1));
  $("next").addEventListener("click", () => go(state.index + 1));
  $("next-unrated").addEventListener("click", () => go(firstUnrated(state.index + 1)));
  $("comment").addEventListener("input", () => {
    const answer = answerFor(itemAt(state.index));
    answer.comment = $("comment").value;
    clearTimeout(commentTimer);
    commentTimer = setTimeout(() => save(answer), 300);
  });
  const remembered = localStorage.getItem("tunesmith-rater");
  if (remembered) {
    $("rater").value = remembered;
    await start();
  }
}

init();
