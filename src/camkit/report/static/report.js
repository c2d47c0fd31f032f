"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const images = data.images;
  const perPage = data.perPage;
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? "" : Number(v).toFixed(d);

  // Table columns: key, header, how to read a value from an image, numeric or not.
  const columns = [
    {key: "index", title: "#", num: true, get: (im) => im.index + 1},
    {key: "image", title: "image", num: false, get: (im) => im.name},
    {key: "top1", title: "top-1", num: false, get: (im) => im.top5.length ? (im.top5[0][1] || String(im.top5[0][0])) : ""},
    {key: "p", title: "p(top-1)", num: true, get: (im) => im.top5.length ? im.top5[0][2] : null},
    {key: "class", title: "explained", num: false, get: (im) => im.target ? (im.target[1] || String(im.target[0])) : ""},
    {key: "pclass", title: "p(explained)", num: true, get: (im) => im.target ? im.target[2] : null},
  ];
  for (const [method, metric] of data.metricColumns) {
    columns.push({key: method + "." + metric, title: method + " " + metric, num: true,
      get: (im) => (im.metrics[method] || {})[metric] ?? null});
  }
  const status = (im) => im.error ? "error" : (im.notes || []).length ? "note" : "ok";
  if (images.some((im) => status(im) !== "ok")) columns.splice(2, 0, {key: "status", title: "status", num: false, get: status});
  columns.push({key: "boxes", title: "boxes", num: true, get: (im) => im.maps.reduce((n, m) => n + m.boxes.length, 0)});
  images.forEach((im, i) => { im.index = i; });

  let sortKey = "index", sortDir = 1, page = 0, shown = images.slice();

  function matches(im, token) {
    const m = token.match(/^([\w.+-]+)(<=|>=|<|>|=)(-?[\d.]+(?:e-?\d+)?)$/i);
    if (m) {
      const col = columns.find((c) => c.key.toLowerCase() === m[1].toLowerCase());
      if (col) {
        const v = col.get(im), x = parseFloat(m[3]);
        if (v === null || v === undefined || Number.isNaN(v)) return false;
        return {"<": v < x, ">": v > x, "<=": v <= x, ">=": v >= x, "=": v === x}[m[2]];
      }
    }
    const text = [im.name, im.source, im.error ? "error " + im.error : "", ...(im.notes || []), ...im.top5.map((t) => t[1] || ""), im.target ? im.target[1] || "" : ""]
      .join(" ").toLowerCase();
    return text.includes(token.toLowerCase());
  }

  function update() {
    const tokens = document.getElementById("filter").value.trim().split(/\s+/).filter(Boolean);
    shown = images.filter((im) => tokens.every((t) => matches(im, t)));
    const col = columns.find((c) => c.key === sortKey);
    shown.sort((a, b) => {
      let x = col.get(a), y = col.get(b);
      const xm = x === null || x === undefined || Number.isNaN(x), ym = y === null || y === undefined || Number.isNaN(y);
      if (xm || ym) return xm === ym ? a.index - b.index : (xm ? 1 : -1);  // missing values last
      if (!col.num) { x = String(x).toLowerCase(); y = String(y).toLowerCase(); }
      return (x < y ? -1 : x > y ? 1 : a.index - b.index) * sortDir;
    });
    const pages = Math.max(1, Math.ceil(shown.length / perPage));
    page = Math.min(page, pages - 1);
    document.getElementById("page").textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("count").textContent = shown.length + " of " + images.length + " images";
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
    for (const th of document.querySelectorAll("#head th")) {
      th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none");
    }
    const slice = shown.slice(page * perPage, (page + 1) * perPage);
    document.getElementById("rows").innerHTML = slice.map((im) => (im.error ? '<tr class="error">' : "<tr>") + columns.map((c) => {
      const v = c.get(im);
      if (c.key === "image") return '<td><a class="jump" data-index="' + im.index + '">' + esc(v) + "</a></td>";
      return c.num ? '<td class="num">' + (c.key === "index" || c.key === "boxes" ? v : fmt(v, 3)) + "</td>" : "<td>" + esc(v) + "</td>";
    }).join("") + "</tr>").join("");
    document.getElementById("cards").innerHTML = slice.length ? slice.map(card).join("")
      : '<p class="empty">No image matches the filter.</p>';
  }

  function figure(src, full, w, h, boxes, caption) {
    const rects = boxes.map((b) => '<rect x="' + b[0] + '" y="' + b[1] + '" width="' + (b[2] - b[0]) + '" height="' + (b[3] - b[1]) +
      '" fill="none" stroke="lime" stroke-width="' + Math.max(2, Math.max(w, h) / 120) + '"></rect>').join("");
    return '<figure><img src="' + src + '" data-full="' + full + '" data-caption="' + esc(caption) + '" alt="' + esc(caption) + '">' +
      (rects ? '<svg viewBox="0 0 ' + w + " " + h + '" preserveAspectRatio="none">' + rects + "</svg>" : "") + "</figure>";
  }

  function card(im) {
    const top5 = im.top5.map((t) => "<tr><td>" + esc(t[1] || t[0]) + '</td><td class="num">' + fmt(t[2], 3) +
      '</td><td><span class="bar" style="width:' + Math.round(t[2] * 120) + 'px"></span></td></tr>').join("");
    const methods = [...new Set(im.maps.map((m) => m.method))];
    const layers = [...new Set(im.maps.map((m) => m.layer))];
    let grid = "<tr><th></th>" + layers.map((l) => "<th>" + esc(l) + "</th>").join("") + "</tr>";
    for (const method of methods) {
      grid += "<tr><th>" + esc(method) + "</th>" + layers.map((layer) => {
        const m = im.maps.find((e) => e.method === method && e.layer === layer);
        return "<td>" + (m ? figure(m.thumb, m.full, im.w, im.h, m.boxes, im.name + " \u00b7 " + method + " \u00b7 " + layer) : "") + "</td>";
      }).join("") + "</tr>";
    }
    const metricNames = [...new Set(Object.values(im.metrics).flatMap((v) => Object.keys(v)))];
    const metrics = metricNames.length ? '<table class="metrics"><tr><th>method</th>' + metricNames.map((n) => "<th>" + esc(n) + "</th>").join("") +
      "</tr>" + Object.entries(im.metrics).map(([method, v]) => "<tr><td>" + esc(method) + "</td>" +
        metricNames.map((n) => '<td class="num">' + fmt(v[n], 3) + "</td>").join("") + "</tr>").join("") + "</table>" : "";
    const boxes = im.maps.filter((m) => m.boxes.length).map((m) => esc(m.method) + ": " +
      m.boxes.map((b) => "[" + b.slice(0, 4).join(", ") + "]").join(" ")).join("<br>");
    const target = im.target ? "explained: " + esc(im.target[1] || im.target[0]) + " (class " + im.target[0] + ", p = " + fmt(im.target[2], 3) + ")" : "";
    const notes = (im.error ? '<p class="error">error: ' + esc(im.error) + "</p>" : "") +
      (im.notes || []).map((n) => '<p class="note">' + esc(n) + "</p>").join("");
    return '<section class="card" id="card-' + im.index + '"><h2>' + esc(im.name) + (im.error ? "" : ' <small>' + im.w + "\u00d7" + im.h + "</small>") + "</h2>" + notes +
      '<div class="top">' + figure(im.thumb, im.full, im.w, im.h, [], im.name) +
      "<div>" + (top5 ? '<table class="top5">' + top5 + "</table>" : "") + "<p>" + target + "</p>" +
      (boxes ? "<p>boxes (x0, y0, x1, y1):<br>" + boxes + "</p>" : "") + metrics + "</div></div>" +
      '<table class="overlays">' + grid + "</table></section>";
  }

  const head = document.getElementById("head");
  head.innerHTML = columns.map((c) => '<th data-key="' + esc(c.key) + '" aria-sort="none">' + esc(c.title) + "</th>").join("");
  head.addEventListener("click", (e) => {
    const th = e.target.closest("th");
    if (!th) return;
    if (sortKey === th.dataset.key) sortDir = -sortDir; else { sortKey = th.dataset.key; sortDir = 1; }
    page = 0;
    update();
  });
  document.getElementById("filter").addEventListener("input", () => { page = 0; update(); });
  document.getElementById("prev").addEventListener("click", () => { page -= 1; update(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; update(); });
  document.getElementById("rows").addEventListener("click", (e) => {
    const a = e.target.closest("a.jump");
    if (a) document.getElementById("card-" + a.dataset.index).scrollIntoView();
  });
  const viewer = document.getElementById("viewer");
  document.getElementById("cards").addEventListener("click", (e) => {
    const img = e.target.closest("figure img");
    if (!img) return;
    document.getElementById("viewer-img").src = img.dataset.full;
    document.getElementById("viewer-caption").textContent = img.dataset.caption;
    viewer.classList.add("open");
  });
  viewer.addEventListener("click", () => viewer.classList.remove("open"));
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") viewer.classList.remove("open"); });
  document.getElementById("meta").textContent = data.meta;
  update();
})();
