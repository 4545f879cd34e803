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
  var elt = event.detail.elt;
  if (result && elt && (elt.id === "upload-form" || elt.id === "folder-form")) {
    result.textContent = "Uploading…";
  }
});
// A folder upload names each file by its path inside the folder (FormData alone sends the base
// name), so the server sees the folder's layout and its name. Hidden files and folders (.git,
// .DS_Store) are not sent; a torch.distributed.checkpoint's .metadata is.
document.addEventListener("htmx:configRequest", function (event) {
  if (!event.detail.elt || event.detail.elt.id !== "folder-form") return;
  var input = document.getElementById("folder-input");
  var data = event.detail.formData;
  if (!input || !data || !input.files) return;
  data.delete("file");
  for (var i = 0; i < input.files.length; i++) {
    var file = input.files[i];
    var path = file.webkitRelativePath || file.name;
    var inner = path.split("/").slice(1);
    var hidden = inner.some(function (part) { return part.charAt(0) === "." && part !== ".metadata"; });
    if (!hidden) data.append("file", file, path);
  }
});
