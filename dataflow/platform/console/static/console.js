// dataflow console: live job lists over the API's event stream, and the job/export buttons.
// No framework, no build step: what the pages need and nothing else.
"use strict";

function eventStream() {
  // The API's job events. Closed when the page is left: a browser keeps a left page (its
  // back-forward cache) with its connection open, and with six per server (HTTP/1.1) a few
  // pages left that way stall the next page's loads. Coming back to a kept page reloads it.
  const events = new EventSource("/api/v1/events");
  window.addEventListener("pagehide", () => events.close());
  window.addEventListener("pageshow", (e) => { if (e.persisted) window.location.reload(); });
  return events;
}

function liveTable(id, kind) {
  // A table whose rows the server renders again (its data-fragment) at each event of
  // ``kind`` on the API's stream, a burst of events making one refresh.
  const table = document.getElementById(id);
  if (!table || !window.EventSource) return;
  const status = document.getElementById("live");
  let pending = null;
  const refresh = () => {
    pending = null;
    fetch(table.dataset.fragment, { headers: { Accept: "text/html" } })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => { table.tBodies[0].innerHTML = html; })
      .catch((e) => { if (status) status.textContent = "update failed (" + e + ")"; });
  };
  const events = eventStream();
  events.addEventListener("open", () => { if (status) status.textContent = "live"; });
  events.addEventListener("error", () => { if (status) status.textContent = "reconnecting…"; });
  events.addEventListener(kind, () => {
    if (pending === null) pending = setTimeout(refresh, 200);
  });
}

function liveJob() {
  // Reload when the job's state is no longer the one shown: checked when the event stream
  // opens (events sent while the page loaded are not missed) and at each of its events.
  const actions = document.querySelector(".actions[data-job]");
  if (!actions || !window.EventSource) return;
  const id = actions.dataset.job;
  const shown = document.getElementById("job-state").textContent.trim();
  const check = () =>
    fetch(`/api/v1/jobs/${id}`)
      .then((r) => (r.ok ? r.json() : null))
      .then((job) => { if (job && job.state !== shown) window.location.reload(); });
  const events = eventStream();
  events.addEventListener("open", check);
  events.addEventListener("job", (e) => { if (JSON.parse(e.data).job_id === id) check(); });
}

function post(url, status, done, reload = true) {
  status.textContent = "…";
  fetch(url, { method: "POST" })
    .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
    .then(({ ok, body }) => {
      status.textContent = ok ? done : (body.message || "refused");
      if (ok && reload) setTimeout(() => window.location.reload(), 300);
    })
    .catch((e) => { status.textContent = "failed: " + e; });
}

function buttons() {
  const status = document.getElementById("action-status");
  document.querySelectorAll("[data-action]").forEach((button) => {
    const id = button.closest("[data-job]").dataset.job;
    button.addEventListener("click", () =>
      post(`/api/v1/jobs/${id}/${button.dataset.action}`, status, button.dataset.action + " asked"));
  });
  document.addEventListener("click", (e) => {  // rows are rendered again: delegated
    const button = e.target.closest("[data-resend]");
    if (button && !button.disabled)
      post(`/api/v1/exports/${button.dataset.resend}/resend`, status, "re-send asked", false);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  liveTable("jobs", "job");
  liveTable("exports", "export");
  liveJob();
  buttons();
});
