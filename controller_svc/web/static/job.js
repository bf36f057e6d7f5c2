// A job's page, live: follows GET /jobs/ID/events (server-sent events) and updates the
// gateways' rows and the job's state. EventSource reconnects by itself after a break,
// sending the id of the last event it saw (Last-Event-ID), so nothing is missed or shown
// twice, also while the controller hands over to a new version of itself. The steering
// forms (pause, resume, cancel) follow the job's state, and the wave in progress the
// gateways' rows: the first wave with a gateway not yet final.
"use strict";
(function () {
  const table = document.getElementById("job-gateways");
  const jobState = document.getElementById("job-state");
  const live = document.getElementById("live");
  if (!table || table.dataset.finished === "true") {
    return;
  }
  const finalStates = new Set((table.dataset.finalStates || "").split(" "));
  const waveCount = Number(table.dataset.waveCount || "1");
  const wave = document.getElementById("rollout-wave");
  const forms = {
    pause: document.getElementById("pause-form"),
    resume: document.getElementById("resume-form"),
    cancel: document.getElementById("cancel-form"),
  };
  const url = table.dataset.events + "?after=" + encodeURIComponent(table.dataset.after || "0");
  const source = new EventSource(url);

  function set(row, cell, text) {
    const element = row.querySelector("." + cell);
    if (element) {
      element.textContent = text;
    }
  }

  function steer(state, finished) {
    const applies = {
      pause: !finished && (state === "PENDING" || state === "RUNNING"),
      resume: !finished && state === "PAUSED",
      cancel: !finished,
    };
    for (const name of Object.keys(forms)) {
      if (forms[name]) {
        forms[name].hidden = !applies[name];
      }
    }
  }

  function showWave() {
    if (!wave || waveCount < 2) {
      return;
    }
    let current = null;
    for (const row of table.querySelectorAll("tbody tr")) {
      const state = row.querySelector(".state");
      const rowWave = Number(row.dataset.wave);
      if (state && !finalStates.has(state.textContent) && (current === null || rowWave < current)) {
        current = rowWave;
      }
    }
    wave.textContent = current === null
      ? "no wave in progress (" + waveCount + " waves)"
      : "wave " + (current + 1) + " of " + waveCount;
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
      showWave();
    }
    if (change.job_state) {
      jobState.textContent = change.job_state;
      steer(change.job_state, change.finished);
    }
    if (change.finished) {
      source.close();
      live.textContent = "Finished.";
      const ending = document.getElementById("job-ending");
      if (ending) {
        ending.hidden = true;
      }
    }
  };
})();
