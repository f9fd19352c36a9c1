// Sorting and filtering of the verdict table; the state lives in the URL fragment,
// e.g. #sort=calibrated_loss&order=desc&verdict=belongs&q=cat
(function () {
  "use strict";
  var table = document.getElementById("records");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var keys = heads.map(function (th) { return th.getAttribute("data-key"); });
  var verdictBox = document.getElementById("filter-verdict");
  var searchBox = document.getElementById("filter-q");
  var countBox = document.getElementById("shown-count");
  var markers = Array.prototype.slice.call(document.querySelectorAll("#histogram .marker"));
  var verdicts = ["all", "belongs", "does not belong", "error"];
  var state = {sort: "index", order: "asc", verdict: "all", q: ""};

  function columnOf(key) {
    if (key === "thumbs") { key = "index"; }
    return keys.indexOf(key);
  }

  function value(row, col, type) {
    var v = row.cells[col].getAttribute("data-v");
    if (v === null || v === "") { return null; }
    if (type === "num") {
      var f = parseFloat(v);
      return isNaN(f) ? null : f;
    }
    return v.toLowerCase();
  }

  function sortRows() {
    var col = columnOf(state.sort);
    if (col < 0) { col = columnOf("index"); state.sort = "index"; }
    var type = heads[col].getAttribute("data-type");
    var sign = state.order === "desc" ? -1 : 1;
    var rows = Array.prototype.slice.call(tbody.rows);
    var decorated = rows.map(function (row) {
      return {row: row, v: value(row, col, type), i: parseInt(row.getAttribute("data-index"), 10)};
    });
    decorated.sort(function (a, b) {
      if (a.v === null || b.v === null) {  // missing values last, in either order
        if (a.v === null && b.v === null) { return a.i - b.i; }
        return a.v === null ? 1 : -1;
      }
      var c = type === "num" ? (a.v < b.v ? -1 : a.v > b.v ? 1 : 0) : a.v.localeCompare(b.v);
      return c !== 0 ? sign * c : a.i - b.i;
    });
    decorated.forEach(function (d) { tbody.appendChild(d.row); });
    heads.forEach(function (th, j) {
      if (j === col) {
        th.setAttribute("aria-sort", state.order === "desc" ? "descending" : "ascending");
      } else {
        th.removeAttribute("aria-sort");
      }
    });
  }

  function filterRows() {
    var q = state.q.toLowerCase();
    var shown = 0;
    var visible = {};
    Array.prototype.forEach.call(tbody.rows, function (row) {
      var ok = (state.verdict === "all" || row.getAttribute("data-verdict") === state.verdict) &&
        (q === "" || (row.getAttribute("data-path") || "").toLowerCase().indexOf(q) >= 0);
      row.hidden = !ok;
      if (ok) { shown += 1; visible[row.getAttribute("data-index")] = true; }
    });
    markers.forEach(function (m) {
      m.classList.toggle("dim", !visible[m.getAttribute("data-index")]);
    });
    countBox.textContent = shown + " of " + tbody.rows.length + " images shown";
  }

  function apply() {
    verdictBox.value = state.verdict;
    if (searchBox.value !== state.q) { searchBox.value = state.q; }
    sortRows();
    filterRows();
  }

  function readFragment() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var sort = params.get("sort");
    state.sort = sort !== null && columnOf(sort) >= 0 ? sort : "index";
    state.order = params.get("order") === "desc" ? "desc" : "asc";
    var verdict = (params.get("verdict") || "all").replace(/[-_]/g, " ").toLowerCase();
    state.verdict = verdicts.indexOf(verdict) >= 0 ? verdict : "all";
    state.q = params.get("q") || "";
  }

  function writeFragment() {
    var params = new URLSearchParams();
    if (state.sort !== "index" || state.order !== "asc") {
      params.set("sort", state.sort);
      params.set("order", state.order);
    }
    if (state.verdict !== "all") { params.set("verdict", state.verdict); }
    if (state.q !== "") { params.set("q", state.q); }
    var text = params.toString();
    try {
      history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
    } catch (e) { /* some browsers refuse on file: pages; the view still changes */ }
  }

  heads.forEach(function (th) {
    function sortHere() {
      var key = th.getAttribute("data-key");
      if (state.sort === key) {
        state.order = state.order === "asc" ? "desc" : "asc";
      } else {
        state.sort = key;
        state.order = "asc";
      }
      apply();
      writeFragment();
    }
    th.addEventListener("click", sortHere);
    th.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortHere(); }
    });
  });
  verdictBox.addEventListener("change", function () {
    state.verdict = verdictBox.value;
    apply();
    writeFragment();
  });
  searchBox.addEventListener("input", function () {
    state.q = searchBox.value;
    filterRows();
    writeFragment();
  });
  markers.forEach(function (m) {
    m.addEventListener("click", function () {
      var row = document.getElementById("r" + m.getAttribute("data-index"));
      if (!row) { return; }
      row.scrollIntoView({block: "center"});
      row.classList.add("flash");
      setTimeout(function () { row.classList.remove("flash"); }, 1500);
    });
  });
  window.addEventListener("hashchange", function () { readFragment(); apply(); });

  readFragment();
  apply();
  document.documentElement.setAttribute("data-ready", "true");
}());
