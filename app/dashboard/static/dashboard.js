// Sluice operators' dashboard: renders JSON from /dashboard/api/*, refreshes on the live
// SSE feed (debounced) and on a timer. Every value goes through textContent, never HTML.
(function () {
  "use strict";

  var cfg = window.SLUICE_DASHBOARD;
  var state = { mode: "", jobs: [], flash: {} };
  var JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
  var BATCH_STATUSES = ["validating", "in_progress", "finalizing", "completed", "failed",
    "cancelling", "cancelled", "expired"];

  // JSON objects arrive with sorted keys: show known keys in their natural order first.
  function ordered(obj, known) {
    return known.filter(function (k) { return k in obj; })
      .concat(Object.keys(obj).filter(function (k) { return known.indexOf(k) < 0; }));
  }

  var $ = window.SluiceDom.byId;

  var el = window.SluiceDom.el;

  function td(text, cls, title) {
    var cell = el("td", cls, text === null || text === undefined ? "—" : text);
    if (title) cell.title = title;
    return cell;
  }

  function ms(value) {
    if (value === null || value === undefined) return null;
    if (value < 1000) return Math.round(value) + " ms";
    if (value < 60000) return (value / 1000).toFixed(value < 10000 ? 2 : 1) + " s";
    return (value / 60000).toFixed(1) + " min";
  }

  function ago(iso) {
    if (!iso) return "—";
    var seconds = (Date.now() - Date.parse(iso)) / 1000;
    if (seconds < 60) return Math.max(0, Math.round(seconds)) + "s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + "m ago";
    if (seconds < 86400) return Math.round(seconds / 3600) + "h ago";
    return new Date(iso).toLocaleDateString();
  }

  function modeBadge(mode) { return el("span", "mode-badge " + mode, mode); }
  function statusBadge(status) { return el("span", "status " + status, status); }

  function shortId(id) { return id && id.length > 16 ? id.slice(0, 6) + "…" + id.slice(-8) : id; }

  function fill(tbody, rows, emptyText, columns) {
    tbody.replaceChildren();
    if (!rows.length) {
      var row = el("tr", "empty");
      var cell = el("td", null, emptyText);
      cell.colSpan = columns;
      row.appendChild(cell);
      tbody.appendChild(row);
      return;
    }
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function renderSummary(s) {
    $("workers-stream").textContent = s.workers_by_mode.stream || 0;
    $("workers-batch").textContent = s.workers_by_mode.batch || 0;
    $("queue-interactive").textContent = s.queues.interactive;
    $("queue-batch").textContent = s.queues.batch;
    $("streams-in-flight").textContent = s.streams_in_flight;
    var oldest = Math.max(s.oldest_queued_seconds.stream || 0, s.oldest_queued_seconds.batch || 0);
    $("oldest-queued").textContent = oldest > 0 ? "oldest queued job waits " + ms(oldest * 1000) : "";
    var sweep = s.sweeper || {};
    $("sweeper-state").textContent = sweep.state === "ok" ? "ok" : (sweep.state || "–").split(":")[0];
    $("sweeper-state").title = sweep.state || "";
    $("sweeper-last").textContent = sweep.last_pass_at
      ? "last complete pass " + ms(Date.now() - sweep.last_pass_at * 1000) + " ago" : "no pass yet";

    var table = $("job-counts");
    table.replaceChildren();
    var head = el("tr");
    head.appendChild(el("th", null, ""));
    JOB_STATUSES.forEach(function (st) { head.appendChild(el("th", "num", st)); });
    table.appendChild(head);
    ordered(s.jobs, ["stream", "batch"]).forEach(function (mode) {
      var row = el("tr");
      var first = el("td");
      first.appendChild(modeBadge(mode));
      row.appendChild(first);
      JOB_STATUSES.forEach(function (st) {
        var n = s.jobs[mode][st] || 0;
        row.appendChild(el("td", "num" + (n ? " st-" + st : " zero"), n));
      });
      table.appendChild(row);
    });

    var chips = $("batch-counts");
    chips.replaceChildren();
    ordered(s.batches, BATCH_STATUSES).forEach(function (st) {
      var n = s.batches[st];
      // ended batches are not counted here (no scan of the table): in-flight statuses only
      if (["completed", "failed", "cancelled", "expired"].indexOf(st) >= 0) return;
      if (!n && ["validating", "finalizing", "cancelling"].indexOf(st) >= 0) return;
      var chip = el("span", "chip" + (n ? "" : " zero"));
      chip.appendChild(el("span", "status " + st, st));
      chip.appendChild(el("b", null, n));
      chips.appendChild(chip);
    });

    var rows = s.workers.map(function (w) {
      var tr = el("tr");
      tr.appendChild(td(w.hostname, "mono"));
      var modes = el("td");
      (w.modes || []).forEach(function (m) { modes.appendChild(modeBadge(m)); });
      tr.appendChild(modes);
      tr.appendChild(td((w.queues || []).join(", "), "mono"));
      tr.appendChild(td(w.age_seconds + "s ago", w.age_seconds > 10 ? "warn" : null));
      var extra = Object.keys(w).filter(function (k) {
        return ["hostname", "modes", "queues", "last_seen", "age_seconds"].indexOf(k) < 0;
      }).map(function (k) { return k + "=" + w[k]; }).join("  ");
      tr.appendChild(td(extra || null, "muted small mono"));
      return tr;
    });
    fill($("workers").tBodies[0], rows, "No live workers: start one with `sluice worker --mode stream|batch`.", 5);
    renderCost(s.cost);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function usd(value) {
    var n = +value || 0;  // small sums keep their significant digits: $0.000042
    return "$" + (n > 0 && n < 0.01 ? n.toFixed(8).replace(/0+$/, "") : n.toFixed(2));
  }

  function renderCost(c) {  // #13: spend today by mode, executor and tenant
    if (!c) return;
    $("cost-today").textContent = usd(c.today_usd);
    $("cost-today").dataset.usd = c.today_usd;
    ["stream", "batch"].forEach(function (mode) {
      $("cost-mode-" + mode).textContent = usd((c.by_mode || {})[mode]);
      $("cost-mode-" + mode).dataset.usd = (c.by_mode || {})[mode] || 0;
    });
    ["workers", "provider"].forEach(function (ex) {
      var node = $("cost-executor-" + ex);
      node.textContent = usd((c.by_executor || {})[ex]) + " (" + usd((c.all_time_by_executor || {})[ex]) + ")";
      node.dataset.usd = (c.by_executor || {})[ex] || 0;
    });
    var rows = (c.by_tenant || []).map(function (t) {
      var tr = el("tr");
      tr.dataset.tenant = t.tenant;
      tr.appendChild(td(t.tenant, "mono"));
      tr.appendChild(td(usd(t.usd), "num"));
      return tr;
    });
    fill($("cost-tenants").tBodies[0], rows, "Nothing spent today.", 2);
    $("cost-tenants-note").textContent = c.tenants > rows.length ? "top " + rows.length + " of " + c.tenants : "";
  }

  function renderJobs(jobs) {
    state.jobs = jobs;
    var rows = jobs.map(function (j) {
      var tr = el("tr", "job-row mode-" + j.mode + (state.flash[j.id] ? " flash" : ""));
      tr.dataset.jobId = j.id;
      tr.dataset.mode = j.mode;
      var idCell = el("td", "mono");
      var link = el("a", "job-link", shortId(j.id));
      link.href = cfg.urls.jobPage + encodeURIComponent(j.id);
      link.title = j.id;
      idCell.appendChild(link);
      tr.appendChild(idCell);
      tr.appendChild(td(j.tenant, null, j.tenant_id));
      var mode = el("td");
      mode.appendChild(modeBadge(j.mode));
      tr.appendChild(mode);
      var status = el("td");
      status.appendChild(statusBadge(j.status));
      if (j.error) status.title = j.error;
      if (j.attempts > 1) status.appendChild(el("span", "muted small", " ×" + j.attempts));
      tr.appendChild(status);
      var route = el("td", "route");
      route.appendChild(el("span", "rule", j.route_rule || "—"));
      if (j.route_reason) route.appendChild(el("span", "reason", j.route_reason));
      tr.appendChild(route);
      tr.appendChild(td(j.model, "mono"));
      tr.appendChild(td(ms(j.ttft_ms), "num"));
      tr.appendChild(td(ms(j.duration_ms), "num"));
      tr.appendChild(td(j.tokens, "num"));
      return tr;
    });
    fill($("jobs").tBodies[0], rows, "No jobs yet.", 9);
    state.flash = {};
  }

  function renderBatches(batches) {
    var rows = batches.map(function (b) {
      var tr = el("tr");
      tr.appendChild(td(shortId(b.id), "mono", b.id));
      tr.appendChild(td(b.tenant, null, b.tenant_id));
      tr.appendChild(td(b.kind));
      var status = el("td");
      status.appendChild(statusBadge(b.status));
      tr.appendChild(status);
      tr.appendChild(td(b.model, "mono"));
      var progress = el("td", "progress-col");
      var bar = el("div", "bar");
      bar.title = b.succeeded + " succeeded, " + b.failed + " failed, " + b.cancelled +
        " cancelled, " + b.running + " running, " + b.queued + " queued";
      [["succeeded", b.succeeded], ["failed", b.failed], ["cancelled", b.cancelled],
       ["running", b.running]].forEach(function (part) {
        if (!part[1] || !b.total) return;
        var seg = el("span", "seg " + part[0]);
        seg.style.width = (100 * part[1] / b.total) + "%";
        bar.appendChild(seg);
      });
      progress.appendChild(bar);
      progress.appendChild(el("span", "bar-label", b.done + " / " + b.total));
      tr.appendChild(progress);
      tr.appendChild(td(b.tokens || null, "num"));
      tr.appendChild(td(ago(b.created_at), "muted", b.created_at));
      return tr;
    });
    fill($("batches").tBodies[0], rows, "No batches yet.", 8);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (res) {
        if (res.status === 401) { window.location = cfg.urls.login; throw new Error("signed out"); }
        if (!res.ok) throw new Error(url + ": HTTP " + res.status);
        return res.json();
      });
  }

  function refreshSummary() {
    return getJSON(cfg.urls.summary).then(renderSummary).catch(function () {});
  }

  function refreshLists() {
    var jobsUrl = cfg.urls.jobs + "?limit=50" + (state.mode ? "&mode=" + state.mode : "");
    return Promise.all([
      getJSON(jobsUrl).then(function (r) { renderJobs(r.data); }),
      getJSON(cfg.urls.batches + "?limit=20").then(function (r) { renderBatches(r.data); })
    ]).catch(function () {});
  }

  // Coalesce bursts of events: at most one refresh per second.
  var pending = null;
  var lastRun = 0;
  function scheduleRefresh() {
    if (pending) return;
    var wait = Math.max(200, 1000 - (Date.now() - lastRun));
    pending = setTimeout(function () {
      pending = null;
      lastRun = Date.now();
      refreshLists();
      refreshSummary();
      document.dispatchEvent(new CustomEvent("sluice:changed"));
    }, wait);
  }

  function connect() {
    if (!window.EventSource) return;
    var live = $("live");
    var source = new EventSource(cfg.urls.stream);
    source.onopen = function () { live.textContent = "● live"; live.className = "live on"; };
    source.onerror = function () { live.textContent = "● reconnecting"; live.className = "live off"; };
    ["job", "batch"].forEach(function (type) {
      source.addEventListener(type, function (event) {
        try {
          var data = JSON.parse(event.data);
          if (type === "job" && data.id) state.flash[data.id] = true;
        } catch (e) { /* a hint only */ }
        scheduleRefresh();
      });
    });
  }

  document.querySelectorAll("#mode-filter button").forEach(function (button) {
    button.addEventListener("click", function () {
      document.querySelectorAll("#mode-filter button").forEach(function (b) { b.classList.remove("active"); });
      button.classList.add("active");
      state.mode = button.dataset.mode;
      refreshLists();
    });
  });

  var initial = JSON.parse($("initial-data").textContent);
  renderSummary(initial.summary);
  renderJobs(initial.jobs);
  renderBatches(initial.batches);
  connect();
  setInterval(refreshSummary, cfg.refreshMs);
  setInterval(refreshLists, cfg.refreshMs * 2);
})();
