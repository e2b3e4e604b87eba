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
  function refresh() {
    fetch(source, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
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
