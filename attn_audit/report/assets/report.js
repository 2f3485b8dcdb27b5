(function () {
  "use strict";
  var root = document.documentElement;
  root.classList.add("js");

  // eps selector: one heatmap per eps; show the chosen one (all are shown when printing).
  document.querySelectorAll(".eps-select").forEach(function (group) {
    var target = document.getElementById(group.getAttribute("data-for"));
    if (!target) { return; }
    function show(value) {
      target.querySelectorAll(".eps-panel").forEach(function (panel) {
        panel.hidden = panel.getAttribute("data-eps") !== value;
      });
    }
    group.querySelectorAll("input[type=radio]").forEach(function (input) {
      input.addEventListener("change", function () { show(input.value); });
      if (input.checked) { show(input.value); }
    });
  });

  // Hover read-out on heatmaps: map the pointer to a (head, layer) cell, show its exact values.
  var cellsNode = document.getElementById("heat-data");
  var heat = cellsNode ? JSON.parse(cellsNode.textContent) : {};
  document.querySelectorAll("figure[data-heat]").forEach(function (fig) {
    var info = heat[fig.getAttribute("data-heat")];
    var svg = fig.querySelector("svg");
    if (!info || !svg) { return; }
    var tip = document.createElement("div");
    tip.className = "tip";
    tip.hidden = true;
    fig.appendChild(tip);
    svg.addEventListener("mousemove", function (ev) {
      var r = svg.getBoundingClientRect();
      var fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
      var b = info.box;
      if (fx < b[0] || fx >= b[2] || fy < b[1] || fy >= b[3]) { tip.hidden = true; return; }
      var col = Math.min(info.cols - 1, Math.floor((fx - b[0]) / (b[2] - b[0]) * info.cols));
      var row = Math.min(info.rows - 1, Math.floor((fy - b[1]) / (b[3] - b[1]) * info.rows));
      tip.textContent = info.cells[row * info.cols + col];
      tip.hidden = false;
      var fr = fig.getBoundingClientRect();
      tip.style.left = Math.min(ev.clientX - fr.left + 12, fr.width - tip.offsetWidth) + "px";
      tip.style.top = (ev.clientY - fr.top + 14) + "px";
    });
    svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  });

  // Sortable tables: click (or Enter on) a header; numbers sort by their data-v value.
  function key(cell) {
    var v = cell.getAttribute("data-v");
    if (v !== null) { var x = parseFloat(v); return isNaN(x) ? -Infinity : x; }
    return cell.textContent.trim().toLowerCase();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, index) {
      th.tabIndex = 0;
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[index]), y = key(b.cells[index]);
          var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                          : (typeof x === "number" ? -1 : 1);
          return asc ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sort(); }
      });
    });
    table.setAttribute("data-ready", "1");
  });
  root.setAttribute("data-ready", "1");
}());
