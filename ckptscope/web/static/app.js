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

// ---- checkpoint page (issue 14): tree keyboard, selection highlight, tree state across the
// stats-ready refresh, the detail drawer, the collapsible tree. Tensor names are attacker text:
// they are compared as attribute values here, never put into selectors or markup. ----
(function () {
  "use strict";
  var ITEM = 'li[role="treeitem"]';
  var TREE_PATHS_BUDGET = 6000; // characters of module paths one tree refresh sends (URL length)
  var pendingChecks = null; // boxes ticked before a tree refresh, re-ticked as they come back
  var focusKey = null; // the tree row that had the focus before a tree refresh
  var shownTensor = null; // the tensor the detail showed last

  function tree() { return document.getElementById("tree"); }
  function items(root) { return Array.prototype.slice.call(root.querySelectorAll(ITEM)); }
  function visibleItems(root) {
    return items(root).filter(function (li) { return !li.parentElement.closest("details:not([open])"); });
  }
  function ownDetails(li) { return li.querySelector(":scope > details"); }
  function leafLink(li) {
    var row = li.querySelector(":scope > .leaf-row");
    return row ? row.querySelector("a.leaf") : null;
  }
  // A tensor link's click through htmx (the detail swapped in, the page kept): a link in rows htmx
  // has just swapped in gets its hx- handlers when the swap settles, and a click before that (Enter
  // right after a module opens) would load the whole page instead; processing it first is harmless
  // for a link htmx already knows.
  function follow(link) {
    if (window.htmx) window.htmx.process(link);
    link.click();
  }
  function keyOf(li) {
    if (!li) return null;
    return li.hasAttribute("data-path") ? "m:" + li.getAttribute("data-path") : "t:" + li.getAttribute("data-tensor");
  }

  // the ARIA tree: arrows move between visible rows, Right/Left open/close (or go to the first
  // child/the parent), Home/End, Enter/Space on a row selects its tensor or opens/closes it
  document.addEventListener("keydown", function (event) {
    var root = tree();
    if (!root || !root.contains(event.target) || event.altKey || event.ctrlKey || event.metaKey) return;
    var li = event.target.closest(ITEM);
    if (!li) return;
    var key = event.key;
    var details = ownDetails(li);
    if (key === "ArrowDown" || key === "ArrowUp" || key === "Home" || key === "End") {
      var shown = visibleItems(root);
      var i = shown.indexOf(li);
      var next = key === "Home" ? shown[0] : key === "End" ? shown[shown.length - 1] : shown[i + (key === "ArrowDown" ? 1 : -1)];
      if (next) next.focus();
    } else if (key === "ArrowRight") {
      if (details && !details.open) {
        details.open = true;
      } else if (details) {
        var child = details.querySelector(ITEM);
        if (child) child.focus();
      }
    } else if (key === "ArrowLeft") {
      if (details && details.open) {
        details.open = false;
        if (li.contains(document.activeElement) && document.activeElement !== li) li.focus();
      } else {
        var parent = li.parentElement.closest(ITEM);
        if (parent) parent.focus();
      }
    } else if ((key === "Enter" || key === " ") && event.target === li) {
      var link = leafLink(li);
      if (link) follow(link);
      else if (details) details.open = !details.open;
    } else {
      return;
    }
    event.preventDefault();
  });

  // aria-expanded follows the <details> it stands for (toggle does not bubble: capture it)
  document.addEventListener("toggle", function (event) {
    var d = event.target;
    if (!d || d.tagName !== "DETAILS" || !d.classList.contains("module")) return;
    var li = d.parentElement;
    if (li && li.getAttribute("role") === "treeitem") li.setAttribute("aria-expanded", d.open ? "true" : "false");
  }, true);

  // the selected tensor (the detail's data-tensor) is highlighted in the table and the tree
  function markSelected() {
    var detail = document.getElementById("detail");
    var name = detail && detail.hasAttribute("data-tensor") ? detail.getAttribute("data-tensor") : null;
    document.querySelectorAll("#tensor-table tbody tr[data-tensor]").forEach(function (tr) {
      var on = tr.getAttribute("data-tensor") === name;
      tr.classList.toggle("selected", on);
      if (on) tr.setAttribute("aria-current", "true");
      else tr.removeAttribute("aria-current");
    });
    document.querySelectorAll("#tree " + ITEM + "[data-tensor]").forEach(function (li) {
      li.setAttribute("aria-selected", li.getAttribute("data-tensor") === name ? "true" : "false");
    });
    if (detail && detail.classList.contains("has-tensor") && name !== shownTensor) {
      detail.scrollTop = 0;
      var box = detail.getBoundingClientRect();
      if (box.top >= window.innerHeight || box.bottom <= 0) detail.scrollIntoView({ block: "start" });
    }
    shownTensor = name;
  }

  // a click anywhere on a table row selects its tensor
  document.addEventListener("click", function (event) {
    var tr = event.target.closest && event.target.closest("#tensor-table tbody tr[data-tensor]");
    if (!tr || event.target.closest("a, button, input, select, label")) return;
    if (window.getSelection && String(window.getSelection()) !== "") return;
    var link = tr.querySelector("a.tname");
    if (link) follow(link);
  });

  // Esc closes the detail (a drawer below 1880 px)
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || event.target.closest("input, select, textarea")) return;
    var close = document.querySelector("#detail.has-tensor .detail-close");
    if (close) {
      event.preventDefault();
      close.click();
    }
  });

  // the tree panel folds away, and stays so on this browser
  function setTreeCollapsed(collapsed) {
    var panels = document.getElementById("panels");
    var button = document.querySelector(".tree-toggle");
    if (!panels || !button) return;
    panels.classList.toggle("tree-collapsed", collapsed);
    button.setAttribute("aria-expanded", collapsed ? "false" : "true");
    button.textContent = collapsed ? "Show" : "Hide";
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest(".tree-toggle");
    if (!button) return;
    var collapsed = button.getAttribute("aria-expanded") === "true";
    setTreeCollapsed(collapsed);
    try { window.localStorage.setItem("ckptscope.treeCollapsed", collapsed ? "1" : ""); } catch (e) { /* storage off */ }
  });

  // stats-ready re-renders the tree: send the modules loaded and open (rendered inline and open by
  // the server), keep the ticked boxes and the focused row
  document.addEventListener("htmx:configRequest", function (event) {
    var root = event.detail.elt;
    if (!root || root.id !== "tree") return;
    var data = event.detail.formData;
    var opened = [];
    var loaded = [];
    root.querySelectorAll("details.module[data-path]").forEach(function (d) {
      if (d.open) opened.push(d.getAttribute("data-path"));
      else if (d.querySelector(":scope > .children > ul")) loaded.push(d.getAttribute("data-path"));
    });
    var budget = TREE_PATHS_BUDGET;
    function send(name, path) {
      budget -= encodeURIComponent(path).length + name.length + 2;
      if (budget >= 0) data.append(name, path);
    }
    opened.forEach(function (p) { send("open", p); });
    loaded.forEach(function (p) { send("expand", p); });
  });
  document.addEventListener("htmx:beforeSwap", function (event) {
    var root = tree();
    if (!root || event.detail.target !== root) return;
    pendingChecks = new Set();
    root.querySelectorAll('input[type="checkbox"][name="module"]').forEach(function (box) {
      if (box.checked) pendingChecks.add(box.value);
    });
    var active = document.activeElement;
    focusKey = active && root.contains(active) ? keyOf(active.closest(ITEM)) : null;
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var root = tree();
    if (!root || !root.contains(event.detail.target)) return;
    if (pendingChecks && pendingChecks.size) {
      event.detail.target.querySelectorAll('input[type="checkbox"][name="module"]').forEach(function (box) {
        if (pendingChecks.has(box.value)) {
          box.checked = true;
          pendingChecks.delete(box.value);
        }
      });
    }
    if (focusKey && event.detail.target === root) {
      var again = items(root).filter(function (li) { return keyOf(li) === focusKey; })[0];
      if (again) again.focus();
      focusKey = null;
    }
  });

  document.addEventListener("htmx:afterSettle", markSelected);
  // a page that came without its tree (a big checkpoint's first view) loads it right after: once it
  // is in, a findings link's module (?module=) gets the focus as on a page that had it
  document.addEventListener("htmx:afterSettle", function (event) {
    var root = tree();
    if (!root || event.detail.target !== root || !root.hasAttribute("data-loads-tree")) return;
    root.removeAttribute("data-loads-tree");
    var target = root.querySelector('li[data-finding-target="true"]');
    if (target) {
      target.focus({ preventScroll: true });
      target.scrollIntoView({ block: "center" });
    }
  });
  document.addEventListener("DOMContentLoaded", function () {
    var stored = "";
    try { stored = window.localStorage.getItem("ckptscope.treeCollapsed") || ""; } catch (e) { /* storage off */ }
    if (stored) setTreeCollapsed(true);
    markSelected();
    // a findings link to a module (?module=): the server rendered the tree open down to it
    var target = document.querySelector('#tree li[data-finding-target="true"]');
    if (target) {
      target.focus({ preventScroll: true });
      target.scrollIntoView({ block: "center" });
    }
  });
})();
// ---- end checkpoint page ----
