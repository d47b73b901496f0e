"use strict";
/* The per-task view of report.html: filters over a small index, a page of tasks at a time, each task's JSON line
   parsed only when it is shown. The state lives in the URL's hash (#outcome=a_not_b&a=1&b=0&q=...), so a view can be
   bookmarked or shared. */
(function () {
  const t0 = performance.now();
  const $ = (id) => document.getElementById(id);
  const index = JSON.parse($("rf-index").textContent);
  const raw = $("rf-tasks").textContent;
  const conds = index.conditions;
  const ntasks = index.ids.length;
  const REFLECTED = 1, FIXED = 2, UNFIXED = 4;

  // Where each task's line starts in the text block (one line per task, in the order of index.ids).
  const starts = new Float64Array(ntasks + 1);
  let pos = 0;
  for (let i = 0; i < ntasks; i++) {
    starts[i] = pos;
    const nl = raw.indexOf("\n", pos);
    pos = nl < 0 ? raw.length + 1 : nl + 1;
  }
  starts[ntasks] = pos;
  const lineOf = (t) => raw.slice(starts[t], starts[t + 1] - 1);

  const defaults = {
    outcome: "any", a: 0, b: conds.length > 1 ? 1 : 0, by: Math.max(0, index.trials - 1),
    refl: "any", rc: "any", q: "", page: 0, size: index.pageSize, open: 0,
  };
  const state = Object.assign({}, defaults);

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    Object.assign(state, defaults);
    for (const key of Object.keys(defaults)) {
      if (!params.has(key)) continue;
      const v = params.get(key);
      state[key] = typeof defaults[key] === "number" ? (parseInt(v, 10) || 0) : v;
    }
  }

  function writeHash() {
    const params = new URLSearchParams();
    for (const key of Object.keys(defaults)) {
      if (state[key] !== defaults[key]) params.set(key, String(state[key]));
    }
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  // ---- filters -----------------------------------------------------------------------------------------------------

  /* Whether condition c solved task t by trial state.by; null when c has no records of t. */
  function solved(c, t) {
    const first = index.first[c][t];
    if (first === -2) return null;
    return first >= 0 && first <= state.by;
  }

  function outcomeMatches(t) {
    if (state.outcome === "any") return true;
    const a = solved(state.a, t), b = solved(state.b, t);
    if (a === null || b === null) return false;
    switch (state.outcome) {
      case "a_not_b": return a && !b;
      case "b_not_a": return b && !a;
      case "differ": return a !== b;
      case "both": return a && b;
      case "neither": return !a && !b;
    }
    return true;
  }

  function reflMatches(t) {
    if (state.refl === "any") return true;
    const which = state.rc === "any" ? conds.map((_, c) => c) : [parseInt(state.rc, 10)];
    return which.some((c) => {
      const code = index.refl[c] ? index.refl[c][t] : 0;
      if (state.refl === "fixed") return (code & FIXED) !== 0;
      if (state.refl === "unfixed") return (code & UNFIXED) !== 0 && (code & FIXED) === 0;
      if (state.refl === "none") return index.first[c][t] !== -2 && (code & REFLECTED) === 0;
      return true;
    });
  }

  /* The tasks whose line holds the query (task id or any text), as a Set; the line is JSON, so the query is looked for
     as JSON writes it. */
  let lower = null;
  const searchCache = new Map();
  function searchSet(q) {
    if (!q) return null;
    if (searchCache.has(q)) return searchCache.get(q);
    const needle = JSON.stringify(q.toLowerCase()).slice(1, -1).replace(/</g, "\\u003c");
    const found = new Set();
    if (lower === null) lower = raw.toLowerCase();
    if (lower.length === raw.length) {
      let at = lower.indexOf(needle);
      while (at >= 0) {
        const t = lineAt(at);
        found.add(t);
        at = lower.indexOf(needle, starts[t + 1]);
      }
    } else {  // lower-casing changed lengths (rare letters): search line by line
      for (let t = 0; t < ntasks; t++) if (lineOf(t).toLowerCase().includes(needle)) found.add(t);
    }
    searchCache.set(q, found);
    return found;
  }

  function lineAt(offset) {
    let lo = 0, hi = ntasks - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= offset) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  function matching() {
    const found = searchSet(state.q.trim());
    const out = [];
    for (let t = 0; t < ntasks; t++) {
      if (found !== null && !found.has(t)) continue;
      if (outcomeMatches(t) && reflMatches(t)) out.push(t);
    }
    return out;
  }

  // ---- rendering ---------------------------------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function badge(c, t) {
    const first = index.first[c][t];
    if (first === -2) return el("span", "badge none", conds[c] + ": no records");
    if (first >= 0) return el("span", "badge ok", conds[c] + ": solved at trial " + first);
    return el("span", "badge bad", conds[c] + ": unsolved");
  }

  function renderStep(strings, step) {
    if (step.length === 2) return el("li", "k note", strings[step[0]]);  // [note, count]: steps left out here
    const li = el("li", step.length > 3 ? "invalid" : "");
    [["thought", step[0]], ["action", step[1]], ["observation", step[2]]].forEach(([name, i]) => {
      if (strings[i] === "") return;
      const div = el("div", "field");
      div.append(el("span", "k", name), document.createTextNode(strings[i]));
      li.append(div);
    });
    if (step.length > 3) li.append(el("div", "k", "invalid action"));
    return li;
  }

  function renderTrial(strings, trial) {
    const [num, ret, success, endReason, steps, refl, memory, error] = trial;
    const box = el("div", "trial " + (success ? "ok" : "bad"));
    box.append(el("div", "thead", "trial " + num + " · return " + Number(ret).toFixed(3) + " · " +
      (success ? "solved" : "failed") + " (" + endReason + ")" + (memory ? " · memory: " + memory + (memory > 1 ? " reflections" : " reflection") : "")));
    const ol = el("ol", "steps");
    let number = 1;  // each step keeps its number in the episode, also after steps left out
    steps.forEach((s) => {
      const li = renderStep(strings, s);
      if (s.length === 2) number += s[1];
      else li.value = number++;
      ol.append(li);
    });
    box.append(ol);
    if (error >= 0) box.append(el("div", "error", "error: " + strings[error]));
    if (refl >= 0) {
      const r = el("div", "reflection");
      r.append(el("span", "k", "reflection"), document.createTextNode(strings[refl]));
      box.append(r);
    }
    return box;
  }

  function renderTask(details, t) {
    const [, strings, perCond] = JSON.parse(lineOf(t));
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = "repeat(" + conds.length + ", minmax(0, 1fr))";
    perCond.forEach((trials, c) => {
      const col = el("div", "cond");
      col.append(el("h4", "", conds[c]));
      if (trials === null) col.append(el("div", "k", "no records of this task"));
      else trials.forEach((trial) => col.append(renderTrial(strings, trial)));
      grid.append(col);
    });
    details.append(grid);
  }

  function card(t) {
    const details = el("details", "task");
    details.dataset.task = index.ids[t];
    details.dataset.t = String(t);
    const summary = el("summary");
    summary.append(el("span", "tid", index.ids[t]));
    conds.forEach((_, c) => summary.append(badge(c, t)));
    details.append(summary);
    details.addEventListener("toggle", () => {
      if (details.open && details.childElementCount === 1) renderTask(details, t);
    });
    return details;
  }

  function render() {
    const tasks = matching();
    const pages = Math.max(1, Math.ceil(tasks.length / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    const shown = tasks.slice(state.page * state.size, (state.page + 1) * state.size);
    const list = $("rf-list");
    list.replaceChildren(...shown.map(card));
    if (state.open) list.querySelectorAll("details.task").forEach((d) => { d.open = true; renderIfNeeded(d); });
    const status = $("rf-status");
    status.textContent = tasks.length + " of " + ntasks + " tasks match · page " + (state.page + 1) + " of " + pages;
    status.dataset.count = String(tasks.length);
    status.dataset.page = String(state.page);
    status.dataset.shown = shown.map((t) => index.ids[t]).join("\n");
    writeHash();
  }

  function renderIfNeeded(details) {
    // The toggle event comes later (asynchronously); render now so that the page is complete when render() returns.
    if (details.childElementCount === 1) renderTask(details, parseInt(details.dataset.t, 10));
  }

  // ---- controls ----------------------------------------------------------------------------------------------------

  function fill(select, options) {
    options.forEach(([value, label]) => select.append(new Option(label, String(value))));
  }

  const CONTROLS = { "rf-outcome": "outcome", "rf-a": "a", "rf-b": "b", "rf-by": "by", "rf-refl": "refl",
    "rf-rc": "rc", "rf-size": "size" };

  function setUp() {
    const condOptions = conds.map((name, c) => [c, name]);
    fill($("rf-a"), condOptions);
    fill($("rf-b"), condOptions);
    fill($("rf-rc"), [["any", "any condition"], ...condOptions]);
    fill($("rf-by"), Array.from({ length: Math.max(1, index.trials) }, (_, i) => [i, String(i)]));
    const sizes = [...new Set([10, 20, 50, 100, index.pageSize])].sort((x, y) => x - y);
    fill($("rf-size"), sizes.map((n) => [n, n + " per page"]));
    for (const [id, key] of Object.entries(CONTROLS)) {
      const select = $(id);
      select.addEventListener("change", () => {
        state[key] = typeof defaults[key] === "number" ? parseInt(select.value, 10) : select.value;
        state.page = 0;
        render();
      });
    }
    const q = $("rf-q");
    q.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { state.q = q.value; state.page = 0; render(); }
    });
    q.addEventListener("search", () => { state.q = q.value; state.page = 0; render(); });
    $("rf-prev").addEventListener("click", () => { state.page -= 1; render(); });
    $("rf-next").addEventListener("click", () => { state.page += 1; render(); });
    $("rf-open").addEventListener("click", () => { state.open = 1; render(); });
    $("rf-close").addEventListener("click", () => { state.open = 0; render(); });
  }

  /* The controls show the state (from the hash); a value the page does not offer falls back to its default. */
  function syncControls() {
    for (const [id, key] of Object.entries(CONTROLS)) {
      const select = $(id);
      if (![...select.options].some((o) => o.value === String(state[key]))) state[key] = defaults[key];
      select.value = String(state[key]);
    }
    $("rf-q").value = state.q;
  }

  readHash();
  setUp();
  syncControls();
  render();
  window.addEventListener("hashchange", () => { readHash(); syncControls(); render(); });
  // The page's own script, and the whole opening (from the navigation's start: reading and parsing the file too).
  document.documentElement.dataset.loadMs = String(Math.round(performance.now() - t0));
  document.documentElement.dataset.openMs = String(Math.round(performance.now()));
  document.documentElement.dataset.ready = "1";
})();
