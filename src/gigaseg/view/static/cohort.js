// The cohort table: click a heading to sort by it (again to reverse); the filter keeps rows whose
// slide name holds its words, and terms such as dice<0.9 or pieces>=2 compare a column with a number.
// ?filter=... and ?sort=dice (or -dice, descending) in the address start it so.
(function () {
  "use strict";
  const table = document.getElementById("cohort");
  const body = table.tBodies[0];
  const filter = document.getElementById("filter");
  const shown = document.getElementById("shown");
  const rows = Array.from(body.rows);
  let sortKey = null, descending = false;

  function value(row, key) {
    const cell = row.querySelector('td[data-key="' + key + '"]');
    return cell ? cell.dataset.value : "";
  }

  function sortBy(key, type) {
    descending = sortKey === key ? !descending : false;
    sortKey = key;
    const sorted = rows.slice().sort(function (a, b) {
      const x = value(a, key), y = value(b, key);
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // missing values last
      const order = type === "number" ? parseFloat(x) - parseFloat(y) : x.localeCompare(y, undefined, {numeric: true});
      return descending ? -order : order;
    });
    sorted.forEach(function (row) { body.appendChild(row); });
    Array.from(table.tHead.rows[0].cells).forEach(function (th) {
      th.classList.toggle("sorted", th.dataset.key === key);
      th.classList.toggle("descending", th.dataset.key === key && descending);
    });
  }

  const COMPARISON = /^([a-z]+)(<=|>=|<|>|=)(-?[0-9.]+)$/;
  const ALIASES = {area: "area", mm2: "area", tissue: "fraction", fraction: "fraction", pieces: "pieces",
                   seconds: "seconds", dice: "dice"};

  function matches(row, terms) {
    return terms.every(function (term) {
      const m = COMPARISON.exec(term);
      if (m && ALIASES[m[1]]) {
        const raw = value(row, ALIASES[m[1]]);
        if (raw === "") { return false; }
        const x = parseFloat(raw), y = parseFloat(m[3]);
        return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "=": x === y}[m[2]];
      }
      return value(row, "name").toLowerCase().indexOf(term) >= 0;
    });
  }

  function applyFilter() {
    const terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    let count = 0;
    rows.forEach(function (row) {
      const keep = matches(row, terms);
      row.hidden = !keep;
      count += keep ? 1 : 0;
    });
    shown.textContent = count + " of " + rows.length + " shown";
  }

  Array.from(table.tHead.rows[0].cells).forEach(function (th) {
    if (!th.dataset.key) { return; }
    th.addEventListener("click", function () { sortBy(th.dataset.key, th.dataset.type); });
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter") { sortBy(th.dataset.key, th.dataset.type); }
    });
  });
  // Each image says when it has been drawn (read by the browser test).
  Array.from(table.querySelectorAll("img")).forEach(function (img) {
    function loaded() { img.dataset.drawn = img.naturalWidth + "x" + img.naturalHeight; }
    if (img.complete && img.naturalWidth) { loaded(); } else { img.addEventListener("load", loaded); }
  });
  filter.addEventListener("input", applyFilter);
  const asked = new URLSearchParams(window.location.search);
  if (asked.get("filter")) { filter.value = asked.get("filter"); }
  const sort = asked.get("sort");
  if (sort) {
    const th = table.querySelector('th[data-key="' + sort.replace(/^-/, "") + '"]');
    if (th) { sortBy(th.dataset.key, th.dataset.type); if (sort[0] === "-") { sortBy(th.dataset.key, th.dataset.type); } }
  }
  applyFilter();
})();
