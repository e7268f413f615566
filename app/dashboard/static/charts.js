// Sluice dashboard charts: /dashboard/api/charts (the workers' per-minute rollup) drawn
// with the vendored uPlot (uPlot.iife.min.js, MIT). Each figure gets data-points: how
// many non-empty values it shows and data-total their sum, so a test (or a person) can
// see a point arrive or grow.
(function () {
  "use strict";

  var cfg = window.SLUICE_DASHBOARD;
  var STREAM = "#6d3fd6", BATCH = "#b25e00", RED = "#c2261d", BLUE = "#1463c7";
  var CHARTS = {
    ttft: { unit: "s", series: [
      ["p50", "ttft_p50_stream", STREAM], ["p95", "ttft_p95_stream", STREAM, [6, 4]]] },
    duration: { unit: "s", series: [
      ["stream p50", "dur_p50_stream", STREAM], ["stream p95", "dur_p95_stream", STREAM, [6, 4]],
      ["batch p50", "dur_p50_batch", BATCH], ["batch p95", "dur_p95_batch", BATCH, [6, 4]]] },
    jobs: { unit: "", series: [
      ["stream", "jobs_per_min_stream", STREAM], ["batch", "jobs_per_min_batch", BATCH]] },
    tokens: { unit: "", series: [
      ["stream", "tokens_per_s_stream", STREAM], ["batch", "tokens_per_s_batch", BATCH]] },
    errors: { unit: "%", scale: 100, max: 100, series: [
      ["stream", "error_rate_stream", STREAM], ["batch", "error_rate_batch", BATCH]] },
    queues: { unit: "", series: [
      ["interactive", "queue_interactive", BLUE], ["batch", "queue_batch", BATCH]] },
    items: { unit: "", series: [["items", "batch_items_per_s", RED]] }
  };
  var plots = {};
  var windowName = "1h";

  function fmt(unit) {
    return function (u, v) { return v === null || v === undefined ? "—" : (+v.toPrecision(3)) + unit; };
  }

  function columns(payload, spec) {
    var scale = spec.scale || 1;
    return spec.series.map(function (s) {
      return (payload.series[s[1]] || []).map(function (v) { return v === null ? null : v * scale; });
    });
  }

  function make(name, spec, node, data) {
    var width = Math.max(260, node.clientWidth || 320);
    var opts = {
      width: width, height: 170,
      legend: { show: true },
      cursor: { points: { size: 6 } },
      scales: { x: { time: true }, y: { range: function (u, lo, hi) {
        return [0, spec.max || (hi > 0 ? hi * 1.15 : 1)];
      } } },
      axes: [
        { stroke: "#6b7385", grid: { stroke: "#eef0f5" }, size: 30 },
        { stroke: "#6b7385", grid: { stroke: "#eef0f5" }, size: 58,
          values: function (u, vals) { return vals.map(function (v) { return +v.toFixed(3) + spec.unit; }); } }
      ],
      series: [{}].concat(spec.series.map(function (s) {
        return { label: s[0], stroke: s[2], width: 1.6, dash: s[3], spanGaps: true,
                 points: { show: true, size: 3 }, value: fmt(spec.unit) };
      }))
    };
    return new uPlot(opts, data, node);
  }

  function render(payload) {
    document.querySelectorAll("#charts .chart").forEach(function (figure) {
      var name = figure.dataset.chart;
      var spec = CHARTS[name];
      if (!spec) return;
      var cols = columns(payload, spec);
      var data = [payload.t].concat(cols);
      var points = 0, total = 0;
      cols.forEach(function (c) { c.forEach(function (v) { if (v !== null && v > 0) { points += 1; total += v; } }); });
      figure.dataset.points = String(points);
      figure.dataset.total = total.toFixed(4);
      var node = figure.querySelector(".plot");
      if (!window.uPlot) { node.textContent = "charts unavailable"; return; }
      if (!plots[name]) {
        plots[name] = make(name, spec, node, data);
      } else {
        plots[name].setData(data);
      }
    });
    document.getElementById("charts").dataset.window = payload.window;
  }

  function refresh() {
    return fetch(cfg.urls.charts + "?window=" + encodeURIComponent(windowName), {
      credentials: "same-origin", headers: { Accept: "application/json" }
    }).then(function (res) {
      if (!res.ok) throw new Error("charts: HTTP " + res.status);
      return res.json();
    }).then(render).catch(function () {});
  }

  document.querySelectorAll("#chart-window button").forEach(function (button) {
    button.addEventListener("click", function () {
      document.querySelectorAll("#chart-window button").forEach(function (b) { b.classList.remove("active"); });
      button.classList.add("active");
      windowName = button.dataset.window;
      Object.keys(plots).forEach(function (k) { plots[k].destroy(); delete plots[k]; });
      refresh();
    });
  });

  // the live feed's changes (dashboard.js), at most one refresh a second, and a timer
  var pending = null;
  document.addEventListener("sluice:changed", function () {
    if (pending) return;
    pending = setTimeout(function () { pending = null; refresh(); }, 1000);
  });
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      Object.keys(plots).forEach(function (k) {
        var node = document.querySelector('#charts [data-chart="' + k + '"] .plot');
        plots[k].setSize({ width: Math.max(260, node.clientWidth), height: 170 });
      });
    }, 200);
  });
  refresh();
  setInterval(refresh, cfg.refreshMs);
})();
