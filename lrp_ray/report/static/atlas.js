/* The atlas index: sort by any column, filter by module, layer, feature number, activation, relevance and
   class share. Works on the rows already in the page (no network, no data files). */
(function () {
  "use strict";
  var table = document.getElementById("atlas");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var count = document.getElementById("shown");
  function num(v) { var x = parseFloat(v); return isNaN(x) ? null : x; }
  // One record per row, read once: sorting and filtering never touch the DOM text again.
  var recs = rows.map(function (tr) {
    var d = tr.dataset, shares = {};
    Object.keys(d).forEach(function (k) { if (k.indexOf("s_") === 0) { shares[k] = num(d[k]); } });
    return {tr: tr, m: d.m, l: d.l, f: d.f, a: num(d.a), r: num(d.r), n: num(d.n), shares: shares,
            order: num(d.o)};
  });
  var ctl = {
    module: document.getElementById("f-module"), layer: document.getElementById("f-layer"),
    feature: document.getElementById("f-feature"), amin: document.getElementById("f-amin"),
    rmin: document.getElementById("f-rmin"), cls: document.getElementById("f-class"),
    smin: document.getElementById("f-smin")
  };
  var PAGE = 200, page = 0, matching = [];
  var pager = {prev: document.getElementById("p-prev"), next: document.getElementById("p-next"),
               info: document.getElementById("p-info"), all: document.getElementById("p-all")};
  function val(el) { return el ? el.value.trim() : ""; }
  // Only one page of rows is laid out at a time: a table of 3,000 rows stays fast to sort and filter.
  function show() {
    var all = pager.all && pager.all.checked, pages = Math.max(1, Math.ceil(matching.length / PAGE));
    page = Math.min(page, pages - 1);
    var lo = all ? 0 : page * PAGE, hi = all ? matching.length : Math.min(matching.length, lo + PAGE);
    recs.forEach(function (x) { x.tr.hidden = true; });
    for (var i = lo; i < hi; i += 1) { matching[i].tr.hidden = false; }
    if (pager.info) {
      pager.info.textContent = matching.length ? "rows " + (lo + 1) + "\u2013" + hi : "no rows";
    }
    if (pager.prev) { pager.prev.disabled = all || page === 0; }
    if (pager.next) { pager.next.disabled = all || hi >= matching.length; }
  }
  function apply() {
    var m = val(ctl.module), l = val(ctl.layer), f = val(ctl.feature), amin = num(val(ctl.amin)),
        rmin = num(val(ctl.rmin)), cls = val(ctl.cls), smin = num(val(ctl.smin)), shown = 0;
    var feats = f ? f.split(/[\s,]+/).filter(Boolean) : null;
    matching = recs.filter(function (x) {
      return (!m || x.m === m) && (!l || x.l === l) && (!feats || feats.indexOf(x.f) >= 0) &&
        (amin === null || (x.a !== null && x.a >= amin)) && (rmin === null || (x.r !== null && x.r >= rmin)) &&
        (!cls || smin === null || ((x.shares[cls] || 0) >= smin));
    });
    shown = matching.length;
    page = 0;
    if (count) { count.textContent = String(shown); }
    show();
  }
  function key(x, k) {
    if (k === "m") { return x.order; }
    if (k === "l" || k === "f") { return parseInt(x[k], 10); }
    if (k.indexOf("s_") === 0) { return x.shares[k]; }
    return x[k];
  }
  var sorted = {k: null, dir: 1};
  function sortBy(k, th) {
    sorted.dir = sorted.k === k ? -sorted.dir : (k === "m" || k === "l" || k === "f" ? 1 : -1);
    sorted.k = k;
    recs.sort(function (p, q) {
      var a = key(p, k), b = key(q, k);
      if (a === null || a === undefined) { return 1; }
      if (b === null || b === undefined) { return -1; }
      if (a !== b) { return a < b ? -sorted.dir : sorted.dir; }
      return p.order - q.order || parseInt(p.l, 10) - parseInt(q.l, 10) || parseInt(p.f, 10) - parseInt(q.f, 10);
    });
    recs.forEach(function (x) { x.tr.hidden = true; });
    var frag = document.createDocumentFragment();
    recs.forEach(function (x) { frag.appendChild(x.tr); });
    tbody.appendChild(frag);
    apply();
    heads.forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
    th.classList.add(sorted.dir > 0 ? "sorted-asc" : "sorted-desc");
  }
  heads.forEach(function (th) {
    var k = th.dataset.sort;
    if (k) { th.addEventListener("click", function () { sortBy(k, th); }); }
  });
  if (pager.prev) { pager.prev.addEventListener("click", function () { page -= 1; show(); }); }
  if (pager.next) { pager.next.addEventListener("click", function () { page += 1; show(); }); }
  if (pager.all) { pager.all.addEventListener("change", show); }
  Object.keys(ctl).forEach(function (n) {
    if (ctl[n]) { ctl[n].addEventListener("input", apply); ctl[n].addEventListener("change", apply); }
  });
  // A link like index.html#module=encoder&layer=5 pre-sets the filters.
  if (location.hash.length > 1) {
    location.hash.slice(1).split("&").forEach(function (kv) {
      var p = kv.split("="), el = ctl[decodeURIComponent(p[0])];
      if (el && p.length > 1) { el.value = decodeURIComponent(p[1]); }
    });
  }
  table.classList.add("js");
  apply();
  document.documentElement.dataset.ready = "1";
}());
