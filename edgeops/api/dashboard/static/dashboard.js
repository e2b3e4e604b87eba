// EdgeOps dashboard: live rollout progress and confirmation of dangerous forms.
// No dependencies; the page works without it (reload to see progress).
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var live = document.getElementById("live");
  if (!live || live.getAttribute("data-active") !== "yes") {
    return;
  }
  var source = live.getAttribute("data-src");
  var last = live.innerHTML;
  // Stop for good on an answer that polling again cannot change: 401 (the token is no longer
  // valid: to the login page), 403, 429 (too many failed authentications from this address).
  function stop(status) {
    if (status === 401) {
      window.location.assign("/login");
      return;
    }
    var note = document.createElement("p");
    note.id = "live-stopped";
    note.className = "notice";
    note.setAttribute("role", "status");
    note.textContent = "Live updates stopped (HTTP " + status + "); reload the page to see progress.";
    live.parentNode.insertBefore(note, live);
  }
  function refresh() {
    fetch(source, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401 || response.status === 403 || response.status === 429) {
          stop(response.status);
          return null;
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        if (html !== last) {
          live.innerHTML = html;
          last = live.innerHTML;
        }
        var status = document.getElementById("rollout-status");
        if (status && (status.textContent === "running" || status.textContent === "paused")) {
          window.setTimeout(refresh, 2000);
        }
      })
      .catch(function () { window.setTimeout(refresh, 10000); });
  }
  window.setTimeout(refresh, 2000);
})();
