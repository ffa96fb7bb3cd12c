// Keyboard shortcuts of the labelling page (the page works without them).
// Likert: digit keys answer. Rating: digits rate the highlighted response and move on.
// Ranking: digits pick responses best first. Enter submits, s skips, n focuses the note.
// A held key does not repeat, and a form is sent once by keyboard (the next page follows).
(function () {
  "use strict";
  // A refused second answer (409) shows the next item at /label/vote: reloading it should
  // load /label, not post the refused form again.
  if (document.getElementById("notice") && window.location.pathname === "/label/vote") {
    window.history.replaceState(null, "", "/label");
  }
  var form = document.getElementById("vote-form");
  if (!form) { return; }
  var sent = false;
  form.addEventListener("submit", function () { sent = true; });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { sent = false; }  // restored from the back/forward cache
  });
  var mode = form.dataset.mode;
  var k = parseInt(form.dataset.k, 10);
  var active = 0;
  var picked = [];

  function column(pos) { return document.getElementById("completion-" + pos); }

  function highlight() {
    for (var pos = 0; pos < k; pos++) {
      column(pos).classList.toggle("active", mode === "rating" && pos === active);
    }
  }

  function submit(button) {
    if (button && !sent) { button.click(); }
  }

  function rate(value) {
    var input = form.querySelector("input[name='rating_" + active + "'][value='" + value + "']");
    if (!input) { return; }
    input.checked = true;
    if (active < k - 1) { active += 1; }
    highlight();
  }

  function rank(pos) {
    if (pos >= k || picked.indexOf(pos) !== -1) { return; }
    picked.push(pos);
    if (picked.length === k - 1) {
      for (var rest = 0; rest < k; rest++) {
        if (picked.indexOf(rest) === -1) { picked.push(rest); }
      }
    }
    picked.forEach(function (p, place) {
      form.querySelector("select[name='rank_" + p + "']").value = String(place + 1);
    });
  }

  function resetRanks() {
    picked = [];
    form.querySelectorAll("select").forEach(function (s) { s.value = ""; });
  }

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "TEXTAREA" || tag === "INPUT" && target.type === "text" || tag === "SELECT";
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (typing(event.target)) {
      if (event.key === "Escape") { event.target.blur(); }
      return;
    }
    var key = event.key;
    var digit = /^[1-9]$/.test(key) ? parseInt(key, 10) : 0;
    if (event.repeat && (digit || key === "s" || key === "Enter")) {
      event.preventDefault();  // a held key would answer the next item(s) too
      return;
    }
    var handled = true;
    if (key === "s") {
      submit(document.getElementById("skip"));
    } else if (key === "n") {
      form.querySelector("textarea[name='note']").focus();
    } else if (key === "Enter" && mode !== "likert5" && mode !== "likert8") {
      submit(document.getElementById("submit"));
    } else if (digit && (mode === "likert5" || mode === "likert8")) {
      submit(form.querySelector("button[data-key='" + digit + "']"));
    } else if (digit && mode === "rating") {
      rate(digit);
    } else if (digit && mode === "ranking") {
      rank(digit - 1);
    } else if (key === "Backspace" && mode === "ranking") {
      resetRanks();
    } else if (mode === "rating" && (key === "ArrowLeft" || key === "ArrowRight")) {
      active = Math.min(k - 1, Math.max(0, active + (key === "ArrowLeft" ? -1 : 1)));
      highlight();
    } else {
      handled = false;
    }
    if (handled) { event.preventDefault(); }
  });
  highlight();
})();
