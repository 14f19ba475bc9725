// The Drift weights as a horizontal bar chart: one row per attribute of the user's pool, a bar from
// the zero axis to the signed weight (p = v/|v| has every |weight| <= 1, so the scale is fixed at
// [-1, 1] and a change reads as a change), the attributes decoding uses (the top-m) highlighted,
// and what the last choice changed next to each bar. Plain DOM, no canvas, so it is readable by a
// screen reader and by a test.
"use strict";

(function () {
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function signed(x, digits) {
    const s = x.toFixed(digits);
    return x > 0 ? `+${s}` : s;
  }

  // weights: {name: weight}; selected: names in use; previous: the weights before the last choice
  // (or null). Rows keep the pool's order so that one attribute stays on one line between choices.
  function renderWeights(container, weights, selected, previous) {
    container.replaceChildren();
    const inUse = new Set(selected);
    const names = Object.keys(weights);
    const changes = [];
    for (const name of names) {
      const w = weights[name];
      const before = previous && name in previous ? previous[name] : null;
      const delta = before === null ? null : w - before;
      const row = el("div", `weight-row${inUse.has(name) ? " in-use" : ""}`);
      row.dataset.attribute = name;
      row.dataset.weight = String(w);

      const label = el("span", "weight-name");
      label.title = name;
      label.append(el("span", "weight-label", name)); // long names are cut, the badge never is
      if (inUse.has(name)) label.append(el("span", "badge", "in use"));
      row.append(label);

      const track = el("span", "weight-track");
      track.append(el("span", "weight-axis"));
      const bar = el("span", `weight-bar ${w >= 0 ? "pos" : "neg"}`);
      const width = Math.min(Math.abs(w), 1) * 50; // half the track per unit
      bar.style.width = `${width}%`;
      bar.style.left = w >= 0 ? "50%" : `${50 - width}%`;
      track.append(bar);
      if (before !== null && Math.abs(delta) > 1e-6) {
        const ghost = el("span", "weight-before");
        ghost.style.left = `${50 + Math.max(-1, Math.min(1, before)) * 50}%`;
        ghost.title = `before the last choice: ${before.toFixed(3)}`;
        track.append(ghost);
      }
      row.append(track);

      row.append(el("span", "weight-value", signed(w, 3)));
      const change = el("span", "weight-delta");
      if (delta !== null && Math.abs(delta) > 5e-4) {
        change.textContent = signed(delta, 3);
        change.classList.add(delta > 0 ? "up" : "down");
        changes.push({ name, delta });
      }
      row.append(change);
      container.append(row);
    }
    container.setAttribute("aria-label", "Drift weights: " + names.map(
      (n) => `${n} ${signed(weights[n], 2)}${inUse.has(n) ? " (in use)" : ""}`).join(", "));
    return changes.sort((a, b) => Math.abs(b.delta) - Math.abs(a.delta));
  }

  window.personalignChart = { renderWeights };
})();
