// The job page: every field, the timeline, and for a running stream its text as it is
// generated, read from the same SSE relay clients use (/v1/jobs/{id}/events, for the
// admin's session). Every value goes through textContent, never HTML.
(function () {
  "use strict";

  var cfg = window.SLUICE_JOB;
  var job = JSON.parse(document.getElementById("job-data").textContent);
  var ACTIVE = ["queued", "running"];
  var SHOWN = ["id", "object", "mode", "status", "route", "timings", "timeline", "output",
    "created_at", "started_at", "first_token_at", "finished_at",
    "usage", "error", "request", "choices"];

  var $ = window.SluiceDom.byId;
  var el = window.SluiceDom.el;
  function ms(v) {
    if (v === null || v === undefined) return "—";
    return v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
  }
  function value(v) {
    if (v === null || v === undefined) return "—";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  function renderTimeline(j) {
    var list = $("timeline");
    list.replaceChildren();
    var t = j.timeline || {};
    var start = t.created_at ? Date.parse(t.created_at) : null;
    [["queued", "created_at"], ["started", "started_at"], ["first token", "first_token_at"],
     ["finished", "finished_at"]].forEach(function (step) {
      var at = t[step[1]];
      var item = el("li", at ? "done" : "pending");
      item.dataset.step = step[1];
      item.appendChild(el("span", "step", step[0]));
      item.appendChild(el("span", "at", at ? new Date(at).toLocaleTimeString() : "—"));
      if (at && start !== null) item.appendChild(el("span", "delta muted small", "+" + ms(Date.parse(at) - start)));
      list.appendChild(item);
    });
    var timings = j.timings || {};
    var sum = el("li", "summary muted small",
      "queued " + ms(timings.queued_ms) + " · TTFT " + ms(timings.ttft_ms) + " · total " + ms(timings.duration_ms));
    list.appendChild(sum);
  }

  function renderUsage(u) {
    var box = $("usage");
    box.replaceChildren();
    if (!u) { box.appendChild(el("span", "muted", "—")); return; }
    Object.keys(u).forEach(function (k) {
      var row = el("div", "kv-row");
      row.appendChild(el("span", "muted small", k.replace(/_/g, " ")));
      row.appendChild(el("b", null, value(u[k])));
      box.appendChild(row);
    });
  }

  function renderFields(j) {
    var body = $("fields").tBodies[0];
    body.replaceChildren();
    Object.keys(j).sort().forEach(function (k) {
      if (SHOWN.indexOf(k) >= 0) return;
      var tr = el("tr");
      tr.appendChild(el("th", null, k));
      tr.appendChild(el("td", "mono", value(j[k])));
      body.appendChild(tr);
    });
  }

  function render(j) {
    job = j;
    $("job").dataset.status = j.status;
    var status = $("job-status");
    status.textContent = j.status;
    status.className = "status " + j.status;
    renderTimeline(j);
    renderUsage(j.usage);
    renderFields(j);
    $("request").textContent = JSON.stringify(j.request, null, 2);
    $("error-panel").hidden = !j.error;
    $("error").textContent = j.error ? JSON.stringify(j.error, null, 2) : "";
    var cancel = $("cancel");
    if (cancel && ACTIVE.indexOf(j.status) < 0) cancel.remove();
  }

  function refresh() {
    return fetch(cfg.urls.job, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (j) { if (j) { render(j); if (ACTIVE.indexOf(j.status) < 0) setOutput(j); } return j; });
  }

  function setOutput(j) {
    $("output").textContent = j.output || "";
    $("output-note").textContent = j.finish_reason ? "finish reason: " + j.finish_reason : "";
  }

  function follow() {
    // EventSource sends Last-Event-ID itself when it reconnects: the relay resumes exactly
    var live = $("live");
    var out = $("output");
    var text = "";
    out.textContent = "";
    out.classList.add("streaming");
    $("output-note").textContent = "live from the relay";
    var source = new EventSource(cfg.urls.events);
    source.onopen = function () { live.textContent = "● live"; live.className = "live on"; };
    source.onmessage = function (event) {
      if (event.data === "[DONE]") {
        source.close();
        live.textContent = "ended"; live.className = "live off";
        out.classList.remove("streaming");
        refresh();
        return;
      }
      try {
        var chunk = JSON.parse(event.data);
        if (chunk.error) { $("error-panel").hidden = false; $("error").textContent = JSON.stringify(chunk.error, null, 2); return; }
        (chunk.choices || []).forEach(function (c) {
          if (c.index === 0 && c.delta && c.delta.content) text += c.delta.content;
        });
        out.textContent = text;
        out.dataset.length = String(text.length);
        if (job.status === "queued") { job.status = "running"; $("job-status").textContent = "running"; }
      } catch (e) { /* a comment or a frame we do not draw */ }
    };
    source.onerror = function () { live.textContent = "● reconnecting"; live.className = "live off"; };
  }

  var cancel = $("cancel");
  if (cancel) {
    cancel.addEventListener("click", function () {
      cancel.disabled = true;
      fetch(cfg.urls.cancel, { method: "POST", credentials: "same-origin", headers: { "X-Sluice-Dashboard": "1" } })
        .then(function () { return refresh(); });
    });
  }

  render(job);
  if (ACTIVE.indexOf(job.status) >= 0 && job.mode === "stream") {
    follow();
  } else {
    setOutput(job);
    if (ACTIVE.indexOf(job.status) >= 0) {
      var timer = setInterval(function () {
        refresh().then(function (j) { if (j && ACTIVE.indexOf(j.status) < 0) clearInterval(timer); });
      }, 2000);
    }
  }
})();
