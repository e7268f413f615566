// The playground: POST /v1/jobs (as the signed-in admin key) read with fetch streaming,
// the way a chat front end consumes SSE. A dropped connection resumes from the last event
// id through the job's relay (Last-Event-ID), so no text is lost or repeated; Stop cancels
// the job. `window.sluicePlayground.drop()` cuts the connection on purpose (tests).
(function () {
  "use strict";

  var cfg = window.SLUICE_PLAYGROUND;
  var HEADERS = { "Content-Type": "application/json", "X-Sluice-Dashboard": "1" };
  var run = null;  // the answer in progress

  var $ = window.SluiceDom.byId;
  function ms(v) { return v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(2) + " s"; }
  function status(text) { $("play-status").textContent = text; }

  function loadModels() {
    return fetch(cfg.urls.models, { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("models: HTTP " + r.status); return r.json(); })
      .then(function (body) {
        var select = $("model");
        select.replaceChildren();
        (body.data || []).forEach(function (m) {
          var option = document.createElement("option");
          option.value = m.id;
          option.textContent = m.id;
          select.appendChild(option);
        });
        var preferred = ["mock/chat", "mock/echo"].filter(function (id) {
          return (body.data || []).some(function (m) { return m.id === id; });
        })[0];
        if (preferred) select.value = preferred;
      }).catch(function (e) { status(String(e)); });
  }

  // SSE frames out of a byte stream: calls onEvent({id, data}) per event
  function readSSE(response, onEvent) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    function pump() {
      return reader.read().then(function (part) {
        if (part.done) return;
        buffer += decoder.decode(part.value, { stream: true });
        var frames = buffer.split(/\r?\n\r?\n/);
        buffer = frames.pop();
        frames.forEach(function (frame) {
          var event = { id: null, data: [] };
          frame.split(/\r?\n/).forEach(function (line) {
            if (line.indexOf("data:") === 0) event.data.push(line.slice(5).replace(/^ /, ""));
            else if (line.indexOf("id:") === 0) event.id = line.slice(3).trim();
          });
          if (event.data.length) onEvent({ id: event.id, data: event.data.join("\n") });
        });
        return pump();
      });
    }
    return pump();
  }

  function onEvent(event) {
    if (!run) return;
    if (event.id) run.lastId = event.id;
    if (event.data === "[DONE]") { run.done = true; return; }
    var chunk;
    try { chunk = JSON.parse(event.data); } catch (e) { return; }
    if (chunk.error) { run.error = chunk.error; return; }
    (chunk.choices || []).forEach(function (c) {
      if (c.index !== 0 || !c.delta || !c.delta.content) return;
      if (run.firstAt === null) {
        run.firstAt = performance.now();
        $("ttft").textContent = ms(run.firstAt - run.sentAt);
      }
      run.text += c.delta.content;
      run.pieces += 1;
    });
    if (chunk.usage && chunk.usage.completion_tokens) run.tokens = chunk.usage.completion_tokens;
    $("answer").textContent = run.text;
    $("answer").dataset.length = String(run.text.length);
    var seconds = run.firstAt === null ? 0 : (performance.now() - run.firstAt) / 1000;
    var tokens = run.tokens || Math.round(run.text.length / 4);
    $("tokens").textContent = run.tokens ? String(run.tokens) : "~" + tokens;
    if (seconds > 0.05) $("tps").textContent = (tokens / seconds).toFixed(1);
  }

  function resume() {
    // the same relay, from the last event this page saw: nothing lost, nothing repeated
    var mine = run;
    mine.resumes += 1;
    $("resumes").textContent = String(mine.resumes);
    status("connection dropped; resuming after event " + (mine.lastId || "(none)") + "…");
    mine.abort = new AbortController();
    var headers = mine.lastId ? { "Last-Event-ID": mine.lastId } : {};
    return fetch(cfg.urls.base + "api/jobs/" + encodeURIComponent(mine.jobId) + "/events", {
      credentials: "same-origin", headers: headers, signal: mine.abort.signal
    }).then(function (response) {
      if (response.status === 204) { mine.done = true; return mine; }
      if (!response.ok) throw new Error("resume: HTTP " + response.status);
      status("streaming (resumed)");
      return readSSE(response, onEvent).then(function () { return mine; });
    });
  }

  function follow(mine, response) {
    return readSSE(response, onEvent).then(function () { return mine; }, function (err) {
      if (mine.stopped) return mine;
      return mine;  // a dropped connection: decided below
    }).then(function () {
      if (mine !== run || mine.done || mine.stopped) return finish(mine);
      return resumeLoop(mine);
    });
  }

  function resumeLoop(mine) {
    return resume().catch(function () { return mine; }).then(function () {
      if (mine !== run || mine.done || mine.stopped) return finish(mine);
      if (mine.resumes > 20) { status("gave up resuming"); return finish(mine); }
      return new Promise(function (ok) { setTimeout(ok, 300); }).then(function () { return resumeLoop(mine); });
    });
  }

  function finish(mine) {
    if (mine !== run) return;
    $("stop").disabled = true;
    $("send").disabled = false;
    $("answer").classList.remove("streaming");
    if (!mine.jobId) return;
    return fetch(cfg.urls.base + "api/jobs/" + encodeURIComponent(mine.jobId), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (job) {
        if (!job) return;
        var u = job.usage || {};
        if (u.completion_tokens) {
          $("tokens").textContent = String(u.completion_tokens);
          var gen = job.finished_at && job.first_token_at && job.timings
            ? (job.timings.duration_ms - job.timings.ttft_ms) / 1000 : 0;
          if (gen > 0) $("tps").textContent = (u.completion_tokens / gen).toFixed(1);
        }
        if (job.timings && job.timings.ttft_ms !== null && mine.firstAt === null) $("ttft").textContent = ms(job.timings.ttft_ms);
        if (mine.mode === "batch") { $("answer").textContent = job.output || ""; }
        status(job.status + (mine.error ? ": " + (mine.error.message || mine.error.code) : ""));
        $("answer").dataset.status = job.status;
      });
  }

  function pollBatch(mine) {
    status("queued on the batch channel…");
    return new Promise(function (ok) { setTimeout(ok, 500); }).then(function () {
      return fetch(cfg.urls.base + "api/jobs/" + encodeURIComponent(mine.jobId), { credentials: "same-origin" });
    }).then(function (r) { return r.json(); }).then(function (job) {
      if (mine !== run || mine.stopped) return finish(mine);
      if (job.status === "queued" || job.status === "running") { status(job.status + " (batch)"); return pollBatch(mine); }
      mine.done = true;
      if (job.timings && job.timings.duration_ms !== null) $("ttft").textContent = "— (batch: " + ms(job.timings.duration_ms) + " total)";
      return finish(mine);
    });
  }

  function send(event) {
    event.preventDefault();
    var body = {
      model: $("model").value,
      mode: $("mode").value,
      messages: [{ role: "user", content: $("prompt").value }]
    };
    if (body.mode === "stream") {  // stream_options only with stream: true, as OpenAI's API
      body.stream = true;
      body.stream_options = { include_usage: true };
    }
    if ($("max-tokens").value) body.max_tokens = parseInt($("max-tokens").value, 10);
    run = { text: "", pieces: 0, tokens: 0, lastId: null, jobId: null, done: false, stopped: false,
      error: null, resumes: 0, firstAt: null, sentAt: performance.now(), abort: new AbortController(), mode: null };
    var mine = run;
    ["ttft", "tps", "tokens"].forEach(function (id) { $(id).textContent = "—"; });
    $("resumes").textContent = "0";
    $("answer").textContent = "";
    $("answer").classList.add("streaming");
    delete $("answer").dataset.status;
    $("send").disabled = true;
    status("sending…");
    fetch(cfg.urls.submit, {
      method: "POST", credentials: "same-origin", headers: HEADERS, body: JSON.stringify(body),
      signal: mine.abort.signal
    }).then(function (response) {
      mine.jobId = response.headers.get("X-Sluice-Job-Id");
      var route = response.headers.get("X-Sluice-Route") || "";
      $("route").textContent = route;
      if (mine.jobId) {
        var link = $("job-link");
        link.href = cfg.urls.base + "jobs/" + encodeURIComponent(mine.jobId);
        link.hidden = false;
        $("answer").dataset.jobId = mine.jobId;
      }
      $("stop").disabled = !mine.jobId;
      var type = response.headers.get("Content-Type") || "";
      if (response.ok && type.indexOf("text/event-stream") === 0) {
        mine.mode = "stream";
        status("streaming");
        return follow(mine, response);
      }
      return response.json().then(function (job) {
        if (response.status === 202 || (job && job.object === "job")) {
          mine.mode = "batch";
          mine.jobId = mine.jobId || job.id;
          return pollBatch(mine);
        }
        $("answer").classList.remove("streaming");
        status("refused (" + response.status + "): " + ((job.error && job.error.message) || ""));
        $("send").disabled = false;
      });
    }).catch(function (err) {
      if (mine.jobId && !mine.stopped && !mine.done) return resumeLoop(mine);
      status(String(err));
      $("send").disabled = false;
    });
  }

  function stop() {
    if (!run || !run.jobId) return;
    var mine = run;
    mine.stopped = true;
    $("stop").disabled = true;
    status("stopping…");
    fetch(cfg.urls.base + "api/jobs/" + encodeURIComponent(mine.jobId) + "/cancel", {
      method: "POST", credentials: "same-origin", headers: HEADERS
    }).then(function () {
      // the relay ends with the in-band error and [DONE]; the job keeps the partial text
      setTimeout(function () { if (mine === run) finish(mine); }, 300);
    });
  }

  $("play").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  window.sluicePlayground = {
    drop: function () { if (run && run.abort) run.abort.abort(); },
    state: function () { return run; }
  };
  loadModels();
})();
