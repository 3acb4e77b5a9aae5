/* mqi-async web view: swaps each [data-live] part for a fresh copy every data-refresh seconds. */
"use strict";
(() => {
  const periodMs = Math.max(500, 1000 * Number(document.body.dataset.refresh || "5"));
  const indicator = document.getElementById("live-state");

  function mark(ok) {
    if (!indicator) return;
    indicator.textContent = ok ? "live" : "offline";
    indicator.className = ok ? "live" : "live off";
  }

  async function refresh() {
    let ok = true;
    if (!document.hidden) {
      for (const area of document.querySelectorAll("[data-live]")) {
        try {
          const response = await fetch(area.dataset.live, {
            cache: "no-store",
            credentials: "same-origin",
            headers: { "X-Requested-With": "mqi-live" },
          });
          if (!response.ok) {
            ok = false;
            continue;
          }
          area.innerHTML = await response.text();
          area.dataset.refreshed = String(Date.now());
        } catch (err) {
          ok = false;
        }
      }
      mark(ok);
    }
    window.setTimeout(refresh, periodMs);
  }

  if (document.querySelector("[data-live]")) window.setTimeout(refresh, periodMs);

  document.addEventListener("submit", (event) => {
    const question = event.target.dataset ? event.target.dataset.confirm : undefined;
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
