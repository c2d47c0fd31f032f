"use strict";
(function () {
  // Every value of the data is put into the page as text (textContent, text nodes) or as a number: nothing from
  // the data is ever parsed as HTML.
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const images = data.images;
  const perPage = data.perPage;
  const SVG = "http://www.w3.org/2000/svg";
  const missing = (v) => v === null || v === undefined || (typeof v === "number" && Number.isNaN(v));
  const fmt = (v, d) => missing(v) ? "" : Number(v).toFixed(d);
  const text = (v) => missing(v) ? "" : String(v);
  const picture = (v) => /^data:image\/(webp|jpeg|png);base64,[A-Za-z0-9+\/=]*$/.test(String(v)) ? String(v) : "";

  // An element with a class (or none) and children: strings become text nodes, null/undefined are left out.
  function el(tag, cls, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  // Table columns: key, header, how to read a value from an image, numeric or not.
  const columns = [
    {key: "index", title: "#", num: true, get: (im) => im.index + 1},
    {key: "image", title: "image", num: false, get: (im) => im.name},
    {key: "top1", title: "top-1", num: false, get: (im) => im.top5.length ? text(im.top5[0][1] || im.top5[0][0]) : ""},
    {key: "p", title: "p(top-1)", num: true, get: (im) => im.top5.length ? im.top5[0][2] : null},
    {key: "class", title: "explained", num: false, get: (im) => im.target ? text(im.target[1] || im.target[0]) : ""},
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
        if (missing(v)) return false;
        return {"<": v < x, ">": v > x, "<=": v <= x, ">=": v >= x, "=": v === x}[m[2]];
      }
    }
    const words = [im.name, im.source, im.error ? "error " + im.error : "", ...(im.notes || []), ...im.top5.map((t) => t[1] || ""), im.target ? im.target[1] || "" : ""]
      .map(text).join(" ").toLowerCase();
    return words.includes(token.toLowerCase());
  }

  function row(im) {
    const tr = el("tr", im.error ? "error" : "");
    for (const c of columns) {
      const v = c.get(im);
      if (c.key === "image") {
        const a = el("a", "jump", text(v));
        a.dataset.index = String(im.index);
        tr.append(el("td", "", a));
      } else if (c.num) {
        tr.append(el("td", "num", c.key === "index" || c.key === "boxes" ? text(v) : fmt(v, 3)));
      } else {
        tr.append(el("td", "", text(v)));
      }
    }
    return tr;
  }

  function update() {
    const tokens = document.getElementById("filter").value.trim().split(/\s+/).filter(Boolean);
    shown = images.filter((im) => tokens.every((t) => matches(im, t)));
    const col = columns.find((c) => c.key === sortKey);
    shown.sort((a, b) => {
      let x = col.get(a), y = col.get(b);
      const xm = missing(x), ym = missing(y);
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
    document.getElementById("rows").replaceChildren(...slice.map(row));
    document.getElementById("cards").replaceChildren(...(slice.length ? slice.map(card)
      : [el("p", "empty", "No image matches the filter.")]));
  }

  function figure(src, full, w, h, boxes, caption) {
    const img = document.createElement("img");
    img.src = picture(src);
    img.dataset.full = picture(full);
    img.dataset.caption = caption;
    img.alt = caption;
    const fig = el("figure", "", img);
    if (boxes.length) {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 " + Number(w) + " " + Number(h));
      svg.setAttribute("preserveAspectRatio", "none");
      for (const b of boxes) {
        const r = document.createElementNS(SVG, "rect");
        const [x0, y0, x1, y1] = b.slice(0, 4).map(Number);
        r.setAttribute("x", String(x0));
        r.setAttribute("y", String(y0));
        r.setAttribute("width", String(x1 - x0));
        r.setAttribute("height", String(y1 - y0));
        r.setAttribute("fill", "none");
        r.setAttribute("stroke", "lime");
        r.setAttribute("stroke-width", String(Math.max(2, Math.max(Number(w), Number(h)) / 120)));
        svg.append(r);
      }
      fig.append(svg);
    }
    return fig;
  }

  function card(im) {
    const section = el("section", "card");
    section.id = "card-" + im.index;
    section.append(el("h2", "", text(im.name), im.error ? null : " ", im.error ? null : el("small", "", Number(im.w) + "\u00d7" + Number(im.h))));
    if (im.error) section.append(el("p", "error", "error: " + text(im.error)));
    for (const n of im.notes || []) section.append(el("p", "note", text(n)));

    const side = el("div", "");
    if (im.top5.length) {
      const top5 = el("table", "top5");
      for (const t of im.top5) {
        const bar = el("span", "bar");
        bar.style.width = Math.round((missing(t[2]) ? 0 : Number(t[2])) * 120) + "px";
        top5.append(el("tr", "", el("td", "", text(t[1] || t[0])), el("td", "num", fmt(t[2], 3)), el("td", "", bar)));
      }
      side.append(top5);
    }
    side.append(el("p", "", im.target ? "explained: " + text(im.target[1] || im.target[0]) + " (class " + text(im.target[0]) +
      ", p = " + fmt(im.target[2], 3) + ")" : ""));
    const withBoxes = im.maps.filter((m) => m.boxes.length);
    if (withBoxes.length) {
      const p = el("p", "", "boxes (x0, y0, x1, y1):");
      for (const m of withBoxes) {
        p.append(el("br"), text(m.method) + ": " + m.boxes.map((b) => "[" + b.slice(0, 4).map(Number).join(", ") + "]").join(" "));
      }
      side.append(p);
    }
    const metricNames = [...new Set(Object.values(im.metrics).flatMap((v) => Object.keys(v)))];
    if (metricNames.length) {
      const table = el("table", "metrics", el("tr", "", el("th", "", "method"), ...metricNames.map((n) => el("th", "", n))));
      for (const [method, v] of Object.entries(im.metrics)) {
        table.append(el("tr", "", el("td", "", method), ...metricNames.map((n) => el("td", "num", fmt(v[n], 3)))));
      }
      side.append(table);
    }
    section.append(el("div", "top", figure(im.thumb, im.full, im.w, im.h, [], text(im.name)), side));

    const methods = [...new Set(im.maps.map((m) => m.method))];
    const layers = [...new Set(im.maps.map((m) => m.layer))];
    const grid = el("table", "overlays", el("tr", "", el("th", ""), ...layers.map((l) => el("th", "", text(l)))));
    for (const method of methods) {
      grid.append(el("tr", "", el("th", "", text(method)), ...layers.map((layer) => {
        const m = im.maps.find((e) => e.method === method && e.layer === layer);
        return el("td", "", m ? figure(m.thumb, m.full, im.w, im.h, m.boxes, text(im.name) + " \u00b7 " + method + " \u00b7 " + layer) : null);
      })));
    }
    section.append(grid);
    return section;
  }

  const head = document.getElementById("head");
  head.replaceChildren(...columns.map((c) => {
    const th = el("th", "", c.title);
    th.dataset.key = c.key;
    th.setAttribute("aria-sort", "none");
    return th;
  }));
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
  document.getElementById("meta").textContent = text(data.meta);
  update();
})();
