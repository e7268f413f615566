// The provider capacity card: each provider's calls in flight split by mode (stream, batch)
// against its shared capacity, and (with per-minute limits) the current minute's requests
// and tokens by mode against them, from /dashboard/api/capacity (app/services/capacity.py).
(function () {
  "use strict";
  var card = document.getElementById("capacity-card");
  var cfg = window.SLUICE_DASHBOARD || {};
  if (!card || !window.SluiceDom) return;
  var el = window.SluiceDom.el;

  function bar(split) {
    var bar = el("div", "bar");
    var total = split.capacity || Math.max(1, split.stream + split.batch);
    [["stream", "running"], ["batch", "succeeded"]].forEach(function (part) {
      var n = split[part[0]];
      if (!n) return;
      var seg = el("div", "seg " + part[1]);
      seg.style.width = Math.min(100, (100 * n) / total) + "%";
      bar.appendChild(seg);
    });
    bar.title = split.stream + " stream, " + split.batch + " batch" +
      (split.capacity ? " of " + split.capacity + " (batch may use " + split.batch_share + ")" : "") +
      (split.displaced ? "; " + split.displaced + " batch call(s) finishing" : "");
    return bar;
  }

  // One per-minute limit's window: stream and batch use against the limit.
  function windowBar(use, unit, split) {
    var bar = el("div", "bar");
    [["stream", "running"], ["batch", "succeeded"]].forEach(function (part) {
      var n = use[part[0]];
      if (!n) return;
      var seg = el("div", "seg " + part[1]);
      seg.style.width = Math.min(100, (100 * n) / use.limit) + "%";
      bar.appendChild(seg);
    });
    bar.title = use.stream + " stream, " + use.batch + " batch " + unit + " of " + use.limit +
      " this minute (batch may take " + use.free + " more; " + use.reserve + " kept for streams)" +
      (split.window_resets_in != null ? "; next window in " + Math.ceil(split.window_resets_in) + "s" : "");
    return bar;
  }

  function windowRow(use, unit, split) {
    var row = el("tr", "window-row");
    row.dataset.provider = split.provider;
    row.dataset.unit = unit;
    row.appendChild(el("td", "muted small", "↳ " + unit + " / min"));
    row.appendChild(el("td", use.stream ? null : "zero", use.stream));
    row.appendChild(el("td", use.batch ? null : "zero", use.batch));
    row.appendChild(el("td", null, use.limit));
    var cell = el("td", "progress-col");
    cell.appendChild(windowBar(use, unit, split));
    row.appendChild(cell);
    return row;
  }

  function render(splits) {
    card.replaceChildren(el("div", "card-title", "Provider capacity"));
    var shown = splits.filter(function (s) {
      return s.capacity || s.stream || s.batch || s.requests_per_minute || s.tokens_per_minute;
    });
    if (!shown.length) {
      card.appendChild(el("div", "muted small", "no provider calls in flight"));
      return;
    }
    var table = el("table", "counts");
    var head = el("tr");
    ["provider", "stream", "batch", "capacity", ""].forEach(function (h) { head.appendChild(el("th", null, h)); });
    table.appendChild(head);
    shown.forEach(function (s) {
      var row = el("tr");
      row.appendChild(el("td", null, s.provider));
      row.appendChild(el("td", s.stream ? null : "zero", s.stream));
      row.appendChild(el("td", s.batch ? null : "zero", s.batch));
      row.appendChild(el("td", s.capacity ? null : "zero", s.capacity || "–"));
      var cell = el("td", "progress-col");
      cell.appendChild(bar(s));
      row.appendChild(cell);
      if (s.batch_paused_for) row.title = "batch paused " + Math.ceil(s.batch_paused_for) + "s (upstream 429)";
      table.appendChild(row);
      if (s.requests_per_minute) table.appendChild(windowRow(s.requests_per_minute, "requests", s));
      if (s.tokens_per_minute) table.appendChild(windowRow(s.tokens_per_minute, "tokens", s));
    });
    card.appendChild(table);
  }

  function refresh() {
    return fetch(card.dataset.url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) { render(body.data || []); })
      .catch(function () {});
  }

  render([]);
  refresh();
  setInterval(refresh, cfg.refreshMs || 5000);
})();
