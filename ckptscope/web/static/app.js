// Upload progress for the htmx upload form (kept out of the page: the CSP allows no inline script).
document.addEventListener("htmx:xhr:progress", function (event) {
  var bar = document.getElementById("upload-progress");
  if (!bar || !event.detail.lengthComputable) return;
  bar.hidden = false;
  bar.max = event.detail.total;
  bar.value = event.detail.loaded;
});
document.addEventListener("htmx:beforeRequest", function (event) {
  var result = document.getElementById("upload-result");
  if (result && event.detail.elt && event.detail.elt.id === "upload-form") {
    result.textContent = "Uploading…";
  }
});
