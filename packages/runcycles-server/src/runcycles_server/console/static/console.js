// Cycles console: live refresh by short polling, paused while the tab is hidden.
// The page's <main> is fetched again (same URL, X-Console-Poll: 1) and swapped in, unless
// the operator is using it: focus in a form control, an open action panel, or text typed.
(function () {
  "use strict";
  var main = document.getElementById("main");
  if (!main || !main.hasAttribute("data-live")) return;
  var status = document.getElementById("live-status");
  var seconds = Number(document.body.getAttribute("data-poll-s")) || 5;
  var timer = null;

  function busy() {
    var active = document.activeElement;
    if (active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA|BUTTON|SUMMARY)$/.test(active.tagName)) return true;
    if (main.querySelector("details.actions[open]")) return true;
    var inputs = main.querySelectorAll("form.act input[name=reason], form.act input[name=amount]");
    for (var i = 0; i < inputs.length; i++) if (inputs[i].value) return true;
    return false;
  }

  function refresh() {
    if (document.hidden || busy()) return;
    fetch(window.location.href, { headers: { "X-Console-Poll": "1" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (!html || busy()) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        if (!fresh) return;
        fresh.querySelectorAll(".flash-ok").forEach(function (n) { n.remove(); });
        main.innerHTML = fresh.innerHTML;
        if (status) status.textContent = "Live: updated " + new Date().toLocaleTimeString() + ".";
      })
      .catch(function () { if (status) status.textContent = "Live: the server did not answer; retrying."; });
  }

  function schedule() {
    if (timer) { clearInterval(timer); timer = null; }
    if (!document.hidden) timer = setInterval(refresh, seconds * 1000);
    if (status) status.textContent = document.hidden ? "Live: paused (tab hidden)." : status.textContent;
  }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); schedule(); });
  schedule();
})();
