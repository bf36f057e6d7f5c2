// A job's page, live: follows GET /jobs/ID/events (server-sent events) and updates the
// gateways' rows and the job's state. EventSource reconnects by itself after a break,
// sending the id of the last event it saw (Last-Event-ID), so nothing is missed or shown
// twice, also while the controller hands over to a new version of itself.
"use strict";
(function () {
  const table = document.getElementById("job-gateways");
  const jobState = document.getElementById("job-state");
  const live = document.getElementById("live");
  if (!table || table.dataset.finished === "true") {
    return;
  }
  const url = table.dataset.events + "?after=" + encodeURIComponent(table.dataset.after || "0");
  const source = new EventSource(url);

  function set(row, cell, text) {
    const element = row.querySelector("." + cell);
    if (element) {
      element.textContent = text;
    }
  }

  source.onopen = function () {
    live.textContent = "Live: updated as the gateways report.";
  };
  source.onerror = function () {
    live.textContent = source.readyState === EventSource.CLOSED
      ? "Updates stopped: reload the page."
      : "Reconnecting…";
  };
  source.onmessage = function (message) {
    const change = JSON.parse(message.data);
    const row = change.gateway_id && document.getElementById("job-gw-" + change.gateway_id);
    if (row) {
      if (change.gateway_state) {
        set(row, "state", change.gateway_state);
        set(row, "error", change.error);
      }
      set(row, "progress", change.progress);
      set(row, "vpn-dropped", String(change.vpn_sessions_dropped));
    }
    if (change.job_state) {
      jobState.textContent = change.job_state;
    }
    if (change.finished) {
      source.close();
      live.textContent = "Finished.";
    }
  };
})();
