// The playground: pick a user, talk to the model with two replies per turn, keep the better one
// (that choice is feedback: POST /v1/feedback with completion_id + chosen_index), undo it (DELETE),
// and watch the user's Drift weights move. State lives on the server; this file only keeps the
// conversation of the open tab.
"use strict";

(function () {
  const api = window.personalignApi;
  const chart = window.personalignChart;
  const $ = (id) => document.getElementById(id);

  const state = {
    health: null,
    user: null, // the open profile
    weights: null, // the Drift weights last shown (to show what a choice changed)
    history: [], // the conversation so far: OpenAI messages, each assistant turn the kept reply
    turns: [], // {completionId, texts, feedbackId, chosen, element, closed}
    busy: false,
  };

  // ------------------------------------------------------------------ messages
  function showError(err) {
    const text = err instanceof api.ApiError ? err.describe() : `Unexpected error: ${err.message || err}`;
    $("error-text").textContent = text;
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

  // ------------------------------------------------------------------ server and key
  async function loadHealth() {
    const h = await api.health();
    state.health = h;
    $("server").textContent = `model ${h.model} · ${h.methods.length} methods`;
    for (const id of ["method", "method-a", "method-b"]) {
      const select = $(id);
      select.replaceChildren();
      if (id === "method") option(select, "", "(server default: base)");
      for (const m of h.methods) option(select, m);
    }
    const pick = (id, wanted) => {
      if (h.methods.includes(wanted)) $(id).value = wanted;
    };
    pick("method-a", "preference_prompting");
    pick("method-b", "drift");
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
      throw err;
    }
    clearError();
    $("key").value = "";
    $("key").placeholder = "connected (key kept in this tab only)";
    $("forget").hidden = false;
    $("workspace").hidden = false;
    fillUsers(profiles);
    if (profiles.length) await openUser(profiles[0].user);
    else $("new-user-id").focus();
  }

  function fillUsers(profiles, selected) {
    const select = $("user-select");
    select.replaceChildren();
    if (!profiles.length) option(select, "", "(no user yet: create one)");
    for (const p of profiles) option(select, p.user);
    if (selected) select.value = selected;
  }

  // ------------------------------------------------------------------ user and profile
  async function openUser(user) {
    const profile = await api.request("GET", `/v1/profiles/${encodeURIComponent(user)}`);
    state.user = profile;
    state.weights = null;
    $("user-select").value = user;
    $("preference").value = profile.preference || "";
    $("method").value = profile.method || "";
    $("params").value = Object.keys(profile.params || {}).length ? JSON.stringify(profile.params) : "";
    newConversation();
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
      throw new api.ApiError(400, `parameters must be a JSON object, e.g. {"beta": 1.0}: ${e.message}`, "params");
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new api.ApiError(400, 'parameters must be a JSON object, e.g. {"beta": 1.0}.', "params");
    }
    return value;
  }

  async function saveProfile() {
    const params = parseParams();
    const method = $("method").value || null;
    const body = { preference: $("preference").value.trim() || null, method, params: method ? params : null };
    if (!method && Object.keys(params).length) {
      throw new api.ApiError(400, "parameters need a default method they belong to.", "params");
    }
    state.user = await api.request("PATCH", `/v1/profiles/${encodeURIComponent(state.user.user)}`, body);
    $("profile-saved").textContent = "saved";
    setTimeout(() => ($("profile-saved").textContent = ""), 2000);
  }

  // ------------------------------------------------------------------ beliefs
  // The profile's Drift weights (with what changed since `previous`), the number of choices and the
  // feedback history, all read back from the server.
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
      $("last-change").textContent = describeChanges(changes, before);
      state.weights = dp.weights;
    } else {
      box.replaceChildren();
      box.hidden = true;
      $("chart-empty").hidden = false;
      $("last-change").textContent = previous ? "The last pair was taken out: no Drift profile left." : "";
      state.weights = null;
    }
    const emb = profile.pdpo_embedding;
    $("embedding").hidden = !emb;
    if (emb) $("embedding").textContent = `P-DPO embedding fitted from ${emb.num_pairs} pairs (loss ${emb.loss.toFixed(3)}).`;
    renderHistory(feedback);
  }

  function describeChanges(changes, previous) {
    if (previous === null) return "";
    if (!changes.length) return "The last change moved no weight visibly.";
    const top = changes.slice(0, 3).map((c) => `${c.name} ${c.delta > 0 ? "+" : ""}${c.delta.toFixed(3)}`);
    return `What the last change did: ${top.join(", ")}.`;
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
      status.textContent = f.folded ? " · folded" : f.fold_error ? ` · not folded: ${f.fold_error}` : " · folding";
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

  // ------------------------------------------------------------------ chat
  function newConversation() {
    state.history = [];
    state.turns = [];
    $("turns").replaceChildren();
  }

  function methodLine(info) {
    if (!info) return "";
    const params = Object.entries(info.params || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    let line = `method: ${info.method}`;
    if (params.length) line += ` · ${params.join(", ")}`;
    if (info.preference) line += ` · preference: “${snippet(info.preference, 60)}”`;
    if (info.drift) line += ` · Drift profile of ${info.drift.num_pairs} pairs`;
    if (info.pdpo && info.pdpo.fitted_embedding) line += ` · fitted embedding (${info.pdpo.num_pairs} pairs)`;
    return line;
  }

  // The turn before a new message: its choice is closed; if none was made, its first reply is what
  // the conversation continues from.
  function closeLastTurn() {
    const last = state.turns[state.turns.length - 1];
    if (!last || last.closed) return;
    last.closed = true;
    for (const b of last.element.querySelectorAll("button")) b.disabled = true;
    if (last.chosen === null && last.texts) {
      state.history.push({ role: "assistant", content: last.texts[0] });
      last.element.querySelector(".reply").classList.add("continued");
    }
  }

  async function send(text) {
    if (state.busy) return;
    const content = text.trim();
    if (!content) throw new api.ApiError(400, "write a message first.", "message");
    const mode = document.querySelector('input[name="mode"]:checked').value;
    const maxTokens = Number($("max-tokens").value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new api.ApiError(400, "max tokens must be a whole number of at least 1.", "max_tokens");
    }
    closeLastTurn();
    const messages = [...state.history, { role: "user", content }];
    const body = { model: state.health.model, messages, user: state.user.user, max_tokens: maxTokens };
    if (mode === "methods") {
      body.personalization = { methods: [$("method-a").value, $("method-b").value] };
    } else {
      body.n = 2; // two samples of the profile's method (sampled: identical replies cannot be compared)
      body.temperature = 0.9;
    }
    const turn = { completionId: null, texts: null, feedbackId: null, chosen: null, closed: false };
    const li = $("turn-template").content.firstElementChild.cloneNode(true);
    li.querySelector(".user-msg").textContent = content;
    const replies = [0, 1].map((i) => {
      const r = $("reply-template").content.firstElementChild.cloneNode(true);
      r.dataset.index = String(i);
      r.querySelector(".choose").disabled = true;
      r.querySelector(".choose").setAttribute("aria-label", `Keep reply ${i + 1}`);
      r.querySelector(".choose").addEventListener("click", () => guarded(() => choose(turn, i)));
      r.querySelector(".undo").addEventListener("click", () => guarded(() => undoFeedback(turn.feedbackId)));
      li.querySelector(".replies").append(r);
      return r;
    });
    turn.element = li;
    $("turns").append(li);
    state.turns.push(turn);
    const texts = ["", ""];
    state.busy = true;
    $("send").disabled = true;
    try {
      await api.stream(body, (chunk) => {
        turn.completionId = chunk.id;
        for (const c of chunk.choices || []) {
          const reply = replies[c.index];
          if (!reply) continue;
          if (chunk.personalization && c.delta && c.delta.role) {
            reply.querySelector(".reply-meta").textContent = methodLine(chunk.personalization);
          }
          if (c.delta && c.delta.content) {
            texts[c.index] += c.delta.content;
            reply.querySelector(".reply-text").textContent = texts[c.index];
          }
          if (c.finish_reason) {
            reply.querySelector(".reply-text").setAttribute("aria-busy", "false");
            reply.dataset.finish = c.finish_reason;
          }
        }
      });
      turn.texts = texts;
      state.history.push({ role: "user", content });
      for (const r of replies) {
        if (!r.querySelector(".reply-text").textContent) r.querySelector(".reply-text").textContent = "(empty reply)";
        r.querySelector(".choose").disabled = false;
      }
      li.dataset.completionId = turn.completionId;
      $("message").value = "";
    } catch (err) {
      li.remove();
      state.turns.pop();
      throw err;
    } finally {
      state.busy = false;
      $("send").disabled = false;
    }
  }

  // Keep reply `index`: the choice is posted as feedback and folded (the answer comes once the
  // profile has learnt it), then the chart shows what it changed.
  async function choose(turn, index) {
    if (turn.closed || turn.chosen !== null) return;
    const buttons = turn.element.querySelectorAll("button");
    for (const b of buttons) b.disabled = true;
    const id = `pg-${turn.completionId}`;
    $("last-change").textContent = "Learning from your choice…";
    const previous = state.weights;
    try {
      await api.request("POST", "/v1/feedback", { id, completion_id: turn.completionId, chosen_index: index });
    } catch (err) {
      $("last-change").textContent = "";
      for (const b of turn.element.querySelectorAll(".choose")) b.disabled = false;
      throw err;
    }
    turn.feedbackId = id;
    turn.chosen = index;
    state.history.push({ role: "assistant", content: turn.texts[index] });
    const replies = turn.element.querySelectorAll(".reply");
    replies.forEach((r, i) => {
      r.classList.toggle("chosen", i === index);
      r.classList.toggle("rejected", i !== index);
      const undo = r.querySelector(".undo");
      undo.hidden = i !== index;
      undo.disabled = false;
    });
    replies[index].querySelector(".undo").focus();
    await refreshBeliefs(previous || {});
  }

  // Delete a feedback item (its pair leaves the Drift profile); if it was the open turn's choice,
  // the turn can be chosen again.
  async function undoFeedback(feedbackId) {
    const previous = state.weights;
    await api.request("DELETE", `/v1/feedback/${encodeURIComponent(feedbackId)}`);
    const turn = state.turns.find((t) => t.feedbackId === feedbackId);
    if (turn) {
      turn.feedbackId = null;
      if (!turn.closed) {
        state.history.pop(); // the kept reply no longer continues the conversation
        for (const r of turn.element.querySelectorAll(".reply")) {
          r.classList.remove("chosen", "rejected");
          r.querySelector(".undo").hidden = true;
          r.querySelector(".choose").disabled = false;
        }
        turn.chosen = null;
        turn.element.querySelector(".choose").focus();
      }
    }
    await refreshBeliefs(previous);
  }

  // ------------------------------------------------------------------ wiring
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
      $("key").placeholder = "paste an API key (kept in this tab only)";
      $("key").focus();
    });
    $("user-select").addEventListener("change", (e) => {
      if (e.target.value) guarded(() => openUser(e.target.value));
    });
    $("new-user").addEventListener("submit", (e) => {
      e.preventDefault();
      const id = $("new-user-id").value.trim();
      if (!id) return showError(new api.ApiError(400, "type the new user's id first.", "user"));
      guarded(() => createUser(id));
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
    $("new-chat").addEventListener("click", newConversation);
  }

  async function start() {
    wire();
    await guarded(loadHealth);
    if (api.key()) await guarded(() => connect(api.key()));
    else $("key").focus();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
