// otaguard dashboard: refresh the parts of a page marked data-poll without a full reload.
// The only script of the dashboard; the charts are drawn by the server (inline SVG).
"use strict";
(function () {
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-interval"), 10) || 2000;
    function tick() {
      var active = document.activeElement;
      if (active && el.contains(active) && active.tagName === "INPUT") {
        setTimeout(tick, every); // someone is typing a reason: do not replace the form
        return;
      }
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html !== null) {
            el.innerHTML = html; // server-rendered and autoescaped, like the page itself
            document.body.setAttribute("data-refreshed", String(Date.now()));
          }
        })
        .catch(function () {})
        .then(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll]").forEach(poll);
    document.querySelectorAll("button.danger").forEach(function (b) {
      b.addEventListener("click", function (ev) {
        if (!window.confirm("Abort this campaign? Devices are offered nothing more.")) {
          ev.preventDefault();
        }
      });
    });
  });
})();
