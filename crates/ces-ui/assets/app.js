// CES UI: the one script. On the flows page with "follow", it asks /api/flows for what was stored after the last
// cursor every two seconds and appends the rows (as text: nothing from the store is ever parsed as HTML).
"use strict";
(function () {
  const table = document.getElementById("flows");
  if (!table || table.dataset.follow !== "true") return;
  const body = table.tBodies[0];
  const state = document.getElementById("follow-state");
  let cursor = table.dataset.cursor;
  const query = table.dataset.query;
  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
  }
  function add(r) {
    const row = body.insertRow();
    const src = r.source.namespace && r.source.pod ? r.source.namespace + "/" + r.source.pod : (r.source.ip || "");
    const host = r.destination.host || r.destination.ip || "";
    const dst = r.destination.port ? host + ":" + r.destination.port + "/" + r.protocol : host + "/" + r.protocol;
    cell(row, r.time.replace("T", " ").replace("Z", ""));
    cell(row, r.tenant);
    cell(row, src);
    cell(row, dst);
    cell(row, r.verdict, "v-" + r.verdict);
    cell(row, r.rule ? r.rule.rule : "");
    cell(row, r.outcome);
    cell(row, String((r.bytes ? r.bytes.out + r.bytes.in : 0)), "n");
  }
  async function poll() {
    try {
      const res = await fetch("/api/flows?" + query + (query ? "&" : "") + "after=" + encodeURIComponent(cursor), {
        credentials: "same-origin",
      });
      if (res.ok) {
        const page = await res.json();
        page.records.forEach(add);
        cursor = page.cursor;
        if (state) state.textContent = "following new flows: " + body.rows.length + " shown";
      } else if (state) {
        state.textContent = "following stopped: " + res.status;
        return;
      }
    } catch (e) {
      if (state) state.textContent = "following paused: " + e.message;
    }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
})();
