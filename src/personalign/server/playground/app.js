// The playground: pick a user, talk to the model, compare two replies A and B per turn and say which
// is better (A, B, tie, both bad). A choice of A or B is feedback (POST /v1/feedback with
// completion_id + chosen_index) that the user's learners fold; undo deletes it. The page shows what
// was learned, in words first and as a chart under "details". The server holds the user's state;
// this file keeps the conversations (localStorage, per key and user) and the blind votes.
//
// What a vote means: A or B is a pairwise choice, folded into the user's Drift weights (and P-DPO
// embedding where one is learned). Tie and both bad state no preference between the two replies, so
// they fold nothing: a pairwise learner has no pair to learn from. They count in the personal table
// of methods (a tie half a win for each, both bad a loss for each) and the conversation continues
// from reply A.
"use strict";

(function () {
  const api = window.personalignApi;
  const chart = window.personalignChart;
  const $ = (id) => document.getElementById(id);
  const LABELS = ["A", "B"];

  // Plain words for the default attribute pool (personas/attributes.py); others show their name.
  const WORDS = {
    formal: "a formal tone", concise: "shorter answers", vivid: "vivid imagery", modest: "modesty",
    engineering: "engineering depth", persuasive: "persuasion", emotional: "emotion", humorous: "humor",
    energetic: "energy", computer_science: "computer science depth", easy_words: "simpler words",
    direct: "directness", sociology: "a sociology angle", western: "a western outlook",
    eastern: "an eastern outlook", respectful: "respect", internet_slang: "internet slang",
    proverbs: "proverbs", critical: "critical thinking", vague: "vagueness", creative: "creativity",
    analytic: "analysis", empathetic: "empathy", sycophantic: "flattery", old_fashioned: "old-fashioned style",
    meritocratic: "merit", myopic: "the short term", principled: "principles", hedonist: "pleasure",
    utilitarian: "practical outcomes", realist: "realism", pessimistic: "pessimism", storyteller: "storytelling",
    flexible: "flexibility", spontaneous: "spontaneity", collectivist: "the group", individualistic: "the individual",
    exclamatory: "exclamations", conspiracy: "conspiracy", tech_industry: "tech-industry talk",
    eco_friendly: "ecology", academic: "an academic register", business: "business talk",
    entertaining: "entertainment", literary: "literary style", detailed: "more detail", optimistic: "optimism",
    cautious: "caution",
  };
  const words = (name) => WORDS[name] || name.replace(/_/g, " ");

  const state = {
    health: null,
    user: null, // the open profile
    weights: null, // the Drift weights last shown (to show what a choice changed)
    conv: null, // the open conversation {id, title, turns: [...]}
    turns: [], // live turn records: {data, element}
    streaming: null, // {controller, turn} while a reply streams
  };

  // ------------------------------------------------------------------ messages
  function friendly(err) {
    if (!(err instanceof api.ApiError)) return `Unexpected error: ${err.message || err}`;
    if (err.code === "no_drift_profile") {
      return "Drift has learned nothing for this user yet: choose a reply (A or B) first, or compare other methods.";
    }
    if (err.code === "unknown_parameter") return `Parameters: ${err.message}`;
    return err.describe();
  }
  function showError(err) {
    $("error-text").textContent = friendly(err);
    $("error").hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }
  // Runs an action with errors shown in the page (never a blank reply, never only in the console).
  async function guarded(action) {
    try {
      return await action();
    } catch (err) {
      showError(err);
      return undefined;
    }
  }

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text === undefined ? value : text;
    select.append(o);
  }

  // ------------------------------------------------------------------ local storage
  // The key's id (`pa-<id>-<secret>`) names the slot, so two keys' users never share conversations.
  function slot(kind) {
    const kid = (api.key().split("-")[1] || "key").slice(0, 32);
    return `personalign.${kind}.${kid}.${state.user ? state.user.user : ""}`;
  }
  function load(kind, fallback) {
    try {
      const v = JSON.parse(localStorage.getItem(slot(kind)) || "null");
      return v === null ? fallback : v;
    } catch (_) {
      return fallback;
    }
  }
  function save(kind, value) {
    try {
      localStorage.setItem(slot(kind), JSON.stringify(value));
    } catch (_) {
      /* storage full or off: the page still works, it just forgets on reload */
    }
  }
  function saveConversation() {
    if (!state.conv) return;
    const all = load("conversations", []);
    const i = all.findIndex((c) => c.id === state.conv.id);
    state.conv.turns = state.turns.map((t) => t.data);
    state.conv.updated = Date.now();
    if (i >= 0) all[i] = state.conv;
    else all.push(state.conv);
    save("conversations", all.slice(-20));
    fillConversations();
  }

  // ------------------------------------------------------------------ server and key
  async function loadHealth() {
    const h = await api.health();
    state.health = h;
    $("server").textContent = `model ${h.model} · ${h.methods.length} methods`;
    for (const id of ["method", "method-a", "method-b"]) {
      const select = $(id);
      select.replaceChildren();
      if (id === "method") option(select, "", "(none: preference_prompting with a preference, else base)");
      for (const m of h.methods) option(select, m);
    }
    const learner = $("learner");
    learner.replaceChildren();
    option(learner, "", "(none: Drift weights, and the P-DPO embedding where it is served)");
    for (const l of h.learners || []) option(learner, l);
    if (h.methods.includes("preference_prompting")) $("method-a").value = "preference_prompting";
    if (h.methods.includes("drift")) $("method-b").value = "drift";
  }

  async function connect(key) {
    api.setKey(key);
    let profiles;
    try {
      profiles = await api.listAll("/v1/profiles");
    } catch (err) {
      api.forgetKey();
      $("workspace").hidden = true;
      $("forget").hidden = true;
      $("connect").hidden = false;
      throw err;
    }
    clearError();
    $("key").value = "";
    $("connect").hidden = true; // the chat comes first once connected
    $("forget").hidden = false;
    $("workspace").hidden = false;
    fillUsers(profiles);
    const last = localStorage.getItem("personalign.lastUser");
    const pick = profiles.find((p) => p.user === last) || profiles[0];
    if (pick) await openUser(pick.user);
    else $("new-user-id").focus();
  }

  function fillUsers(profiles, selected) {
    const select = $("user-select");
    select.replaceChildren();
    if (!profiles.length) option(select, "", "(no user yet: create one below)");
    for (const p of profiles) option(select, p.user);
    if (selected) select.value = selected;
  }

  // ------------------------------------------------------------------ user and profile
  async function openUser(user) {
    const profile = await api.request("GET", `/v1/profiles/${encodeURIComponent(user)}`);
    state.user = profile;
    state.weights = null;
    localStorage.setItem("personalign.lastUser", user);
    $("user-select").value = user;
    $("preference").value = profile.preference || "";
    $("method").value = profile.method || "";
    $("learner").value = profile.learner || "";
    $("params").value = Object.keys(profile.params || {}).length ? JSON.stringify(profile.params) : "";
    const convs = load("conversations", []);
    openConversation(convs.length ? convs[convs.length - 1] : null);
    renderLeaderboard();
    await refreshBeliefs(null);
  }

  async function createUser(user) {
    await api.request("POST", "/v1/profiles", { user });
    const profiles = await api.listAll("/v1/profiles");
    fillUsers(profiles, user);
    $("new-user-id").value = "";
    await openUser(user);
  }

  function parseParams() {
    const text = $("params").value.trim();
    if (!text) return {};
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new api.ApiError(400, `parameters must be a JSON object, e.g. {}: ${e.message}`, "params");
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new api.ApiError(400, "parameters must be a JSON object, e.g. {}.", "params");
    }
    return value;
  }

  async function saveProfile() {
    const params = parseParams();
    const method = $("method").value || null;
    const body = { preference: $("preference").value.trim() || null, method, params: method ? params : null,
      learner: $("learner").value || null };
    if (!method && Object.keys(params).length) {
      throw new api.ApiError(400, "parameters need a default method they belong to.", "params");
    }
    state.user = await api.request("PATCH", `/v1/profiles/${encodeURIComponent(state.user.user)}`, body);
    $("profile-saved").textContent = "saved";
    setTimeout(() => ($("profile-saved").textContent = ""), 2000);
    await refreshInContext();
    updateModeNote();
  }

  // ------------------------------------------------------------------ beliefs
  // The profile's Drift weights (with what changed since `previous`), in words and as a chart, the
  // number of choices and the feedback history, all read back from the server.
  async function refreshBeliefs(previous) {
    const user = state.user.user;
    const [profile, feedback] = await Promise.all([
      api.request("GET", `/v1/profiles/${encodeURIComponent(user)}`),
      api.listAll(`/v1/feedback?user=${encodeURIComponent(user)}`),
    ]);
    state.user = profile;
    const choices = feedback.filter((f) => f.chosen_index !== null).length;
    $("choice-count").textContent = String(choices);
    $("choice-word").textContent = choices === 1 ? "choice" : "choices";
    const dp = profile.drift_profile;
    $("pair-count").textContent = String(dp ? dp.num_pairs : 0);
    const box = $("chart");
    if (dp && dp.num_pairs > 0) {
      // a first choice starts the profile: every weight moved from 0
      const before = previous && !Object.keys(previous).length
        ? Object.fromEntries(Object.keys(dp.weights).map((n) => [n, 0])) : previous;
      const changes = chart.renderWeights(box, dp.weights, dp.selected.map((s) => s.name), before);
      box.hidden = false;
      $("chart-empty").hidden = true;
      $("learned-words").textContent = describeWeights(dp.weights);
      $("last-change").textContent = describeChanges(changes, before);
      state.weights = dp.weights;
    } else {
      box.replaceChildren();
      box.hidden = true;
      $("chart-empty").hidden = false;
      $("learned-words").textContent = "Nothing yet: say which reply is better (A or B) and I will learn from it.";
      $("last-change").textContent = previous ? "The last choice was taken back: nothing learned is left." : "";
      state.weights = null;
    }
    const emb = profile.pdpo_embedding;
    $("embedding").hidden = !emb;
    if (emb) {
      $("embedding").textContent = `P-DPO embedding fitted from ${emb.num_pairs} pairs`
        + (emb.loss === null || emb.loss === undefined ? "." : ` (loss ${emb.loss.toFixed(3)}).`);
    }
    renderHistory(feedback);
    state.feedback = feedback;
    await refreshInContext();
    updateModeNote();
  }

  // What the in-context learner believes (a user whose learner is `incontext`): its hypothesis, and
  // the earlier choices it would put in the prompt for the message being written (asked of the server:
  // GET /v1/profiles/{user}/learned, the same code a chat runs).
  async function refreshInContext() {
    const feedback = state.feedback;
    const box = $("incontext");
    box.hidden = state.user.learner !== "incontext";
    if (box.hidden) return;
    const user = encodeURIComponent(state.user.user);
    const prompt = encodeURIComponent($("message").value.slice(0, 4000));
    const got = await api.request("GET", `/v1/profiles/${user}/learned?prompt=${prompt}`);
    const info = got.incontext || {};
    const hyp = (state.user.incontext || {}).hypothesis;
    $("hypothesis").textContent = hyp || "none yet (it is inferred after the first choice).";
    const byId = Object.fromEntries((feedback || []).map((f) => [f.id, f]));
    const list = $("incontext-examples");
    list.replaceChildren();
    for (const id of info.examples || []) {
      const f = byId[id];
      if (!f) continue;
      const li = document.createElement("li");
      const asked = f.prompt.filter((m) => m.role === "user").map((m) => m.content).join(" ");
      li.textContent = `Asked “${clip(asked, 80)}”: kept “${clip(f.chosen, 100)}” over “${clip(f.rejected, 60)}”`;
      list.append(li);
    }
    $("incontext-none").hidden = list.children.length > 0;
  }

  function clip(text, n) {
    return text.length <= n ? text : `${text.slice(0, n - 1)}…`;
  }

  // "You seem to prefer: shorter answers, simpler words; less: a formal tone."
  function describeWeights(weights) {
    const entries = Object.entries(weights).filter(([, w]) => Math.abs(w) >= 0.05);
    const pos = entries.filter(([, w]) => w > 0).sort((a, b) => b[1] - a[1]).slice(0, 3);
    const neg = entries.filter(([, w]) => w < 0).sort((a, b) => a[1] - b[1]).slice(0, 2);
    if (!pos.length && !neg.length) return "No clear preference yet.";
    const more = pos.map(([n]) => words(n)).join(", ");
    const less = neg.map(([n]) => words(n)).join(", ");
    if (!pos.length) return `You seem to want less: ${less}.`;
    return `You seem to prefer: ${more}${neg.length ? `; less: ${less}` : ""}.`;
  }

  function describeChanges(changes, previous) {
    if (previous === null) return "";
    if (!changes.length) return "Your last choice moved nothing visibly.";
    const up = changes.filter((c) => c.delta > 0).slice(0, 2).map((c) => words(c.name));
    const down = changes.filter((c) => c.delta < 0).slice(0, 2).map((c) => words(c.name));
    const parts = [];
    if (up.length) parts.push(`more ${up.join(" and ")}`);
    if (down.length) parts.push(`less ${down.join(" and ")}`);
    return `Your last choice moved me toward ${parts.join(", ")}.`;
  }

  function snippet(text, n) {
    const t = (text || "").replace(/\s+/g, " ").trim();
    if (!t) return "(empty reply)";
    return t.length > n ? `${t.slice(0, n)}…` : t;
  }

  function renderHistory(feedback) {
    const list = $("history");
    list.replaceChildren();
    if (!feedback.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "No feedback yet.";
      list.append(li);
      return;
    }
    for (const f of feedback.slice().reverse()) {
      const li = document.createElement("li");
      li.dataset.feedbackId = f.id;
      const kept = document.createElement("span");
      kept.textContent = `kept “${snippet(f.chosen, 60)}” over “${snippet(f.rejected, 40)}”`;
      const status = document.createElement("span");
      status.className = "muted";
      status.textContent = f.folded ? " · learned" : f.fold_error ? ` · not learned: ${f.fold_error}` : " · learning";
      const del = document.createElement("button");
      del.type = "button";
      del.className = "link";
      del.textContent = "delete";
      del.setAttribute("aria-label", `Delete feedback ${f.id}`);
      del.addEventListener("click", () => guarded(() => undoFeedback(f.id)));
      li.append(kept, status, " ", del);
      list.append(li);
    }
  }

  // ------------------------------------------------------------------ the personal table of methods
  function renderLeaderboard() {
    const votes = load("votes", []);
    const rows = {};
    const row = (m) => (rows[m] = rows[m] || { won: 0, lost: 0, tie: 0, bad: 0 });
    for (const v of votes) {
      const [a, b] = v.methods;
      if (a === b) continue;
      if (v.vote === "a" || v.vote === "b") {
        row(v.vote === "a" ? a : b).won += 1;
        row(v.vote === "a" ? b : a).lost += 1;
      } else {
        row(a)[v.vote] += 1;
        row(b)[v.vote] += 1;
      }
    }
    const body = $("leaderboard").querySelector("tbody");
    body.replaceChildren();
    const names = Object.keys(rows);
    const rate = (r) => {
      const n = r.won + r.lost + r.tie + r.bad;
      return n ? (r.won + 0.5 * r.tie) / n : 0;
    };
    names.sort((x, y) => rate(rows[y]) - rate(rows[x]));
    for (const m of names) {
      const r = rows[m];
      const tr = document.createElement("tr");
      tr.dataset.method = m;
      for (const v of [m, r.won, r.lost, r.tie, r.bad, `${Math.round(100 * rate(r))} %`]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.append(td);
      }
      body.append(tr);
    }
    $("leaderboard").hidden = !names.length;
    $("leaderboard-empty").hidden = names.length > 0;
  }

  // ------------------------------------------------------------------ conversations
  function fillConversations() {
    const select = $("conversation-select");
    const all = load("conversations", []);
    select.replaceChildren();
    for (const c of all.slice().reverse()) option(select, c.id, c.title || "new conversation");
    if (state.conv && !all.some((c) => c.id === state.conv.id)) {
      option(select, state.conv.id, "new conversation");
    }
    if (state.conv) select.value = state.conv.id;
  }

  function openConversation(conv) {
    state.conv = conv || { id: `c${Date.now()}`, title: "", turns: [] };
    state.turns = [];
    $("turns").replaceChildren();
    for (const data of state.conv.turns || []) renderTurn(data);
    fillConversations();
  }

  // The messages the next request continues from: each closed or chosen turn's kept reply (the chosen
  // one; after a tie, both bad, no vote or a stopped reply, reply A).
  function contextMessages() {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const t of state.turns) {
      const d = t.data;
      if (!d.texts) continue;
      messages.push({ role: "user", content: d.user });
      const kept = d.chosen !== null && d.chosen !== undefined ? d.chosen : 0;
      messages.push({ role: "assistant", content: d.texts[kept] });
    }
    return messages;
  }

  // ------------------------------------------------------------------ turns
  function methodLine(info) {
    if (!info) return "";
    const params = Object.entries(info.params || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    let line = `method: ${info.method}`;
    if (params.length) line += ` · ${params.join(", ")}`;
    if (info.preference && info.method !== "base") line += ` · preference: “${snippet(info.preference, 60)}”`;
    const pairs = (n) => `${n} ${n === 1 ? "pair" : "pairs"}`;
    if (info.drift) line += ` · Drift weights from ${pairs(info.drift.num_pairs)}`;
    if (info.pdpo && info.pdpo.fitted_embedding) line += ` · fitted embedding (${pairs(info.pdpo.num_pairs)})`;
    return line;
  }

  // Builds a turn's element from its record (new, or restored from storage) and wires its buttons.
  function renderTurn(data) {
    const li = $("turn-template").content.firstElementChild.cloneNode(true);
    li.querySelector(".user-msg").textContent = data.user;
    const turn = { data, element: li, replies: [] };
    for (let i = 0; i < 2; i++) {
      const r = $("reply-template").content.firstElementChild.cloneNode(true);
      r.dataset.index = String(i);
      r.querySelector(".reply-label").textContent = LABELS[i];
      r.querySelector(".copy").setAttribute("aria-label", `Copy reply ${LABELS[i]}`);
      r.querySelector(".copy").addEventListener("click", () => copyReply(turn, i));
      li.querySelector(".replies").append(r);
      turn.replies.push(r);
    }
    for (const b of li.querySelectorAll(".vote")) {
      b.addEventListener("click", () => guarded(() => vote(turn, b.dataset.vote)));
    }
    li.querySelector(".regenerate").addEventListener("click", () => guarded(() => regenerate(turn)));
    li.querySelector(".undo").addEventListener("click", () => guarded(() => undoFeedback(data.feedbackId)));
    $("turns").append(li);
    state.turns.push(turn);
    paint(turn);
    return turn;
  }

  // Shows a turn's record: texts, stats, the methods (only once voted: the comparison is blind), the
  // vote, and which buttons apply.
  function paint(turn) {
    const d = turn.data;
    const last = state.turns[state.turns.length - 1] === turn;
    const voted = d.vote !== null && d.vote !== undefined;
    turn.replies.forEach((r, i) => {
      const text = d.texts ? d.texts[i] : (d.partial || ["", ""])[i];
      r.querySelector(".reply-text").textContent = text || (d.texts ? "(empty reply)" : "");
      r.querySelector(".reply-text").setAttribute("aria-busy", d.texts || d.stopped ? "false" : "true");
      const stats = (d.stats || [])[i];
      let line = "";
      if (stats) {
        const size = typeof stats.tokens === "number" ? `${stats.tokens} tokens` : `${stats.chars} characters`;
        line = `${size} · ${stats.seconds.toFixed(1)} s`;
      }
      if (d.finish && d.finish[i] === "length") line += " · cut at max tokens";
      if (d.stopped) line += line ? " · stopped" : "stopped";
      r.querySelector(".reply-stats").textContent = line;
      const meta = r.querySelector(".reply-meta");
      meta.textContent = d.infos ? methodLine(d.infos[i]) : "";
      meta.hidden = !(voted || d.mode === "learned") || !d.infos;
      r.classList.toggle("chosen", d.chosen === i);
      r.classList.toggle("rejected", d.chosen !== null && d.chosen !== undefined && d.chosen !== i);
    });
    const canVote = Boolean(d.texts && d.completionId) && !voted && last;
    for (const b of turn.element.querySelectorAll(".vote")) {
      b.disabled = !canVote;
      b.classList.toggle("picked", d.vote === b.dataset.vote);
    }
    turn.element.querySelector(".regenerate").hidden = !last || voted || Boolean(state.streaming);
    turn.element.querySelector(".undo").hidden = !(last && d.feedbackId);
    turn.element.querySelector(".turn-status").textContent = d.status || "";
    turn.element.classList.toggle("continued", !last && !voted && Boolean(d.texts));
  }

  function paintAll() {
    for (const t of state.turns) paint(t);
  }

  function readNumber(id, what, lo, hi, integer) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    const v = Number(raw);
    if (!Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
      throw new api.ApiError(400, `${what} must be ${integer ? "a whole number" : "a number"} in [${lo}, ${hi}].`, id);
    }
    return v;
  }

  // Where replies A and B come from in the "what you taught" mode: the Drift weights the user's
  // choices fitted (once there are any), else the profile's method: so the replies change as they choose.
  function learnedMethod() {
    const dp = state.user && state.user.drift_profile;
    if (dp && dp.num_pairs > 0 && state.health.methods.includes("drift")) return "drift";
    return null;
  }

  function updateModeNote() {
    const mode = document.querySelector('input[name="mode"]:checked').value;
    for (const el of document.querySelectorAll(".methods-only")) el.hidden = mode !== "methods";
    let note;
    if (mode === "learned") {
      note = learnedMethod()
        ? "A and B: two samples steered by what your choices taught (Drift)."
        : "A and B: two samples of your profile's method; once you choose, they come from what you taught.";
    } else {
      note = "Two methods, shown as A and B in a random order; which is which shows after your vote.";
      if ([$("method-a").value, $("method-b").value].includes("drift") && !learnedMethod()) {
        note += " Drift needs a choice first (use “what you taught” once).";
      }
    }
    $("mode-note").textContent = note;
  }

  async function send(text) {
    if (state.streaming) return;
    const content = text.trim();
    if (!content) throw new api.ApiError(400, "write a message first.", "message");
    const maxTokens = readNumber("max-tokens", "max tokens", 1, 100000, true);
    if (maxTokens === null) throw new api.ApiError(400, "max tokens must be a whole number of at least 1.", "max-tokens");
    const mode = document.querySelector('input[name="mode"]:checked').value;
    const body = { model: state.health.model, messages: [...contextMessages(), { role: "user", content }],
                   user: state.user.user, max_tokens: maxTokens, stream_options: { include_usage: true } };
    const temperature = readNumber("temperature", "temperature", 0, 2, false);
    const topP = readNumber("top-p", "top-p", 0.01, 1, false);
    const seed = readNumber("seed", "seed", 0, 2 ** 31 - 1, true);
    body.temperature = temperature === null ? 0.9 : temperature;
    if (topP !== null) body.top_p = topP;
    if (seed !== null) body.seed = seed;
    let methods;
    if (mode === "methods") {
      methods = [$("method-a").value, $("method-b").value];
      if (Math.random() < 0.5) methods.reverse(); // blind: which method is A is not the menu's order
      body.personalization = { methods };
    } else {
      body.n = 2; // two samples (sampled: identical replies cannot be compared)
      const m = learnedMethod();
      if (m) body.personalization = { method: m };
      if (body.temperature === 0) throw new api.ApiError(400, "two samples need a temperature above 0.", "temperature");
    }
    const data = { user: content, mode, methods: methods || null, texts: null, partial: ["", ""], infos: null,
                   completionId: null, chosen: null, vote: null, feedbackId: null, finish: [null, null],
                   stats: null, stopped: false, status: "" };
    const turn = renderTurn(data);
    paintAll();
    if (!state.conv.title) state.conv.title = snippet(content, 40);
    const controller = new AbortController();
    state.streaming = { controller, turn };
    $("send").disabled = true;
    $("stop").hidden = false;
    const t0 = performance.now();
    const seconds = [0, 0];
    const tokens = [null, null];
    try {
      await api.stream(body, (chunk) => {
        data.completionId = chunk.id;
        if (chunk.usage) data.status = `${chunk.usage.completion_tokens} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
        for (const c of chunk.choices || []) {
          if (c.index > 1) continue;
          if (chunk.personalization && c.delta && c.delta.role) {
            data.infos = data.infos || [null, null];
            data.infos[c.index] = chunk.personalization;
          }
          if (c.delta && c.delta.content) data.partial[c.index] += c.delta.content;
          if (c.finish_reason) {
            data.finish[c.index] = c.finish_reason;
            seconds[c.index] = (performance.now() - t0) / 1000;
            tokens[c.index] = c.completion_tokens;
          }
        }
        paint(turn);
      }, controller.signal);
      data.texts = data.partial.slice();
      data.stats = data.texts.map((t, i) => ({ chars: t.length, tokens: tokens[i], seconds: seconds[i] }));
      $("message").value = "";
    } catch (err) {
      if (err instanceof api.ApiError && err.code === "stopped") {
        data.stopped = true; // nothing was recorded: regenerate to compare
        data.status = "stopped: regenerate to get two replies to compare";
      } else {
        turn.element.remove();
        state.turns.pop();
        throw err;
      }
    } finally {
      state.streaming = null;
      $("send").disabled = false;
      $("stop").hidden = true;
      paintAll();
      saveConversation();
    }
  }

  function stop() {
    if (state.streaming) state.streaming.controller.abort();
  }

  async function regenerate(turn) {
    if (state.streaming || state.turns[state.turns.length - 1] !== turn || turn.data.vote) return;
    turn.element.remove();
    state.turns.pop();
    saveConversation();
    await send(turn.data.user);
  }

  async function copyReply(turn, i) {
    const text = turn.data.texts ? turn.data.texts[i] : turn.data.partial[i];
    try {
      await navigator.clipboard.writeText(text);
      turn.data.status = `reply ${LABELS[i]} copied`;
    } catch (_) {
      const sel = window.getSelection();
      const range = document.createRange();
      range.selectNodeContents(turn.replies[i].querySelector(".reply-text"));
      sel.removeAllRanges();
      sel.addRange(range);
      turn.data.status = `reply ${LABELS[i]} selected: copy it with Ctrl+C`;
    }
    paint(turn);
  }

  // A vote on the open turn. A or B posts the choice as feedback: the chosen reply is what the
  // conversation continues from at once (a message sent while the choice is learned continues from
  // it), and the learners fold it; tie and both bad fold nothing (header comment).
  async function vote(turn, which) {
    const d = turn.data;
    if (d.vote || !d.texts || !d.completionId || state.turns[state.turns.length - 1] !== turn) return;
    d.vote = which;
    if (d.methods) {
      const votes = load("votes", []);
      votes.push({ methods: d.methods, vote: which, at: Date.now() });
      save("votes", votes);
      renderLeaderboard();
    }
    if (which === "tie" || which === "bad") {
      d.status = which === "tie" ? "tie: nothing to learn, the conversation continues from A"
        : "both bad: nothing to learn, the conversation continues from A";
      paintAll();
      saveConversation();
      return;
    }
    const index = which === "a" ? 0 : 1;
    d.chosen = index;
    const id = `pg-${d.completionId}`;
    const started = Date.now();
    const lastTook = Number(localStorage.getItem("personalign.learnSeconds") || 0);
    const estimate = lastTook ? ` (the last choice took ${lastTook} s)` : "";
    const tick = setInterval(() => {
      d.status = `learning from your choice… ${Math.round((Date.now() - started) / 1000)} s${estimate}`;
      paint(turn);
    }, 1000);
    d.status = `learning from your choice…${estimate}`;
    paintAll();
    saveConversation();
    const previous = state.weights;
    try {
      await api.request("POST", "/v1/feedback", { id, completion_id: d.completionId, chosen_index: index });
    } catch (err) {
      clearInterval(tick);
      d.vote = null;
      d.chosen = null;
      d.status = "";
      paintAll();
      saveConversation();
      throw err;
    }
    clearInterval(tick);
    d.feedbackId = id;
    const took = Math.max(1, Math.round((Date.now() - started) / 1000));
    localStorage.setItem("personalign.learnSeconds", String(took));
    d.status = `learned in ${took} s`;
    paintAll();
    saveConversation();
    await refreshBeliefs(previous || {});
  }

  // Delete a feedback item (what it taught is taken back); if it was the open turn's choice, the turn
  // can be voted on again.
  async function undoFeedback(feedbackId) {
    const previous = state.weights;
    await api.request("DELETE", `/v1/feedback/${encodeURIComponent(feedbackId)}`);
    const turn = state.turns.find((t) => t.data.feedbackId === feedbackId);
    if (turn) {
      Object.assign(turn.data, { feedbackId: null, chosen: null, vote: null, status: "choice taken back" });
      const votes = load("votes", []);
      if (turn.data.methods && votes.length) {
        votes.pop();
        save("votes", votes);
        renderLeaderboard();
      }
      paintAll();
      saveConversation();
    }
    await refreshBeliefs(previous);
  }

  // ------------------------------------------------------------------ the user's own data
  async function exportData() {
    const user = state.user.user;
    const [profile, feedback] = await Promise.all([
      api.request("GET", `/v1/profiles/${encodeURIComponent(user)}`),
      api.listAll(`/v1/feedback?user=${encodeURIComponent(user)}`),
    ]);
    const blob = new Blob([JSON.stringify({ profile, feedback, conversations: load("conversations", []),
                                            votes: load("votes", []) }, null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `personalign-${user}.json`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  async function deleteData() {
    const user = state.user.user;
    if (!window.confirm(`Delete user ${user}: the profile, every choice and stored reply, and this page's conversations?`)) return;
    await api.request("DELETE", `/v1/profiles/${encodeURIComponent(user)}`);
    for (const kind of ["conversations", "votes"]) localStorage.removeItem(slot(kind));
    const profiles = await api.listAll("/v1/profiles");
    fillUsers(profiles);
    state.user = null;
    if (profiles.length) await openUser(profiles[0].user);
    else {
      openConversation(null);
      $("new-user-id").focus();
    }
  }

  // ------------------------------------------------------------------ wiring
  function typing(e) {
    const t = e.target;
    return t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement;
  }

  function wire() {
    $("error-close").addEventListener("click", clearError);
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key").value.trim();
      if (!key) return showError(new api.ApiError(401, "paste an API key first.", "key"));
      guarded(() => connect(key));
    });
    $("forget").addEventListener("click", () => {
      api.forgetKey();
      $("workspace").hidden = true;
      $("forget").hidden = true;
      $("connect").hidden = false;
      $("key").placeholder = "paste an API key (kept in this tab only)";
      $("key").focus();
    });
    $("user-select").addEventListener("change", (e) => {
      if (e.target.value) guarded(() => openUser(e.target.value));
    });
    $("conversation-select").addEventListener("change", (e) => {
      const conv = load("conversations", []).find((c) => c.id === e.target.value);
      if (conv) openConversation(conv);
    });
    $("new-user").addEventListener("submit", (e) => {
      e.preventDefault();
      const id = $("new-user-id").value.trim();
      if (!id) return showError(new api.ApiError(400, "type the new user's id first.", "user"));
      guarded(() => createUser(id));
    });
    let pending = null; // the in-context examples follow the message being written (debounced)
    $("message").addEventListener("input", () => {
      if (!state.user || state.user.learner !== "incontext") return;
      clearTimeout(pending);
      pending = setTimeout(() => guarded(refreshInContext), 400);
    });
    $("profile-form").addEventListener("submit", (e) => {
      e.preventDefault();
      guarded(saveProfile);
    });
    $("send-form").addEventListener("submit", (e) => {
      e.preventDefault();
      guarded(() => send($("message").value));
    });
    $("message").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("send-form").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => openConversation(null));
    $("export").addEventListener("click", () => guarded(exportData));
    $("delete-data").addEventListener("click", () => guarded(deleteData));
    for (const el of [...document.querySelectorAll('input[name="mode"]'), $("method-a"), $("method-b")]) {
      el.addEventListener("change", updateModeNote);
    }
    document.addEventListener("keydown", (e) => {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey || $("workspace").hidden) return;
      const last = state.turns[state.turns.length - 1];
      if (!last) return;
      const key = e.key.toLowerCase();
      const votes = { a: "a", b: "b", t: "tie", x: "bad" };
      if (key in votes) guarded(() => vote(last, votes[key]));
      else if (key === "r") guarded(() => regenerate(last));
      else return;
      e.preventDefault();
    });
  }

  async function start() {
    wire();
    await guarded(loadHealth);
    if (api.key()) await guarded(() => connect(api.key()));
    else $("key").focus();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
