// Keeps a page live: follows /live (server-sent events; the browser resumes after the last event
// it got when the connection drops) and, while events arrive, fetches the page's main part again
// at most once a second. Pages work without it.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var status = document.getElementById("live-status");
  if (!main || !main.dataset.live || !window.EventSource) return;
  var timer = null;
  var last = 0;
  function say(text) { if (status) status.textContent = text; }
  // What keyboard focus is on inside main, as a selector that finds it again in the new content
  // (by id, else by link target), so a refresh does not throw the reader back to the top.
  function focusKey() {
    var el = document.activeElement;
    if (!el || el === main || !main.contains(el)) return null;
    if (el.id) return "#" + CSS.escape(el.id);
    var href = el.getAttribute("href");
    return href ? 'a[href="' + CSS.escape(href) + '"]' : null;
  }
  function refresh() {
    timer = null;
    last = Date.now();
    var url = location.pathname + location.search + (location.search ? "&" : "?") + "fragment=1";
    fetch(url, { headers: { "Accept": "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var focused = focusKey();
        main.innerHTML = html;
        if (focused) { var el = main.querySelector(focused); if (el) el.focus(); }
        say("live, updated " + new Date().toLocaleTimeString());
      })
      .catch(function () { say("live, update failed"); });
  }
  var source = new EventSource("/live?" + main.dataset.live);
  source.onopen = function () { say("live"); };
  source.onmessage = function () {
    if (timer === null) timer = setTimeout(refresh, Math.max(150, 1000 - (Date.now() - last)));
  };
  source.onerror = function () { say("reconnecting…"); };
})();
