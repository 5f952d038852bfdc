// deepmask viz --html: one image's proposals, drawn on a canvas over the photo.
// The page holds its proposals as COCO compressed RLE strings (window.DEEPMASK);
// masks are decoded when first shown and kept.
"use strict";

// COCO's compressed RLE string -> run lengths (pycocotools' format: 5 bits per
// character, 0x20 marks a continuation, counts after the second are stored as
// differences from the count two before).
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Run lengths (column-major, starting with zeros) -> row-major pixel indices of the mask.
function maskPixels(counts, h, w) {
  let total = 0;
  for (let i = 1; i < counts.length; i += 2) total += counts[i];
  const out = new Uint32Array(total);
  let p = 0, n = 0;
  for (let i = 0; i < counts.length; i++) {
    if (i % 2 === 1) {
      for (let q = p; q < p + counts[i]; q++) out[n++] = (q % h) * w + Math.floor(q / h);
    }
    p += counts[i];
  }
  return out;
}

(function () {
  const data = window.DEEPMASK;
  const W = data.width, H = data.height;
  const canvas = document.getElementById("masks");
  const ctx = canvas.getContext("2d");
  const cache = new Map();
  const on = new Set();
  let gtPixels = null;
  const palette = (i) => data.colors[i];  // the PNG overlays' colours

  function pixels(i) {
    if (!cache.has(i)) cache.set(i, maskPixels(rleCounts(data.props[i][0]), H, W));
    return cache.get(i);
  }

  function gtOutline() {
    if (gtPixels) return gtPixels;
    const inside = new Uint8Array(W * H);
    const edge = [];
    for (const g of data.gt) {
      inside.fill(0);
      for (const q of maskPixels(rleCounts(g), H, W)) inside[q] = 1;
      for (let q = 0; q < W * H; q++) {
        if (!inside[q]) continue;
        const x = q % W, y = (q - x) / W;
        if (x === 0 || y === 0 || x === W - 1 || y === H - 1 || !inside[q - 1] || !inside[q + 1] ||
            !inside[q - W] || !inside[q + W]) edge.push(q);
      }
    }
    gtPixels = edge;
    return edge;
  }

  function draw() {
    const img = ctx.createImageData(W, H);
    const px = img.data;
    const order = [...on].sort((a, b) => b - a);  // the best drawn last, on top
    for (const i of order) {
      const [r, g, b] = palette(i);
      for (const q of pixels(i)) {
        const o = 4 * q;
        px[o] = r; px[o + 1] = g; px[o + 2] = b; px[o + 3] = 140;
      }
    }
    if (document.getElementById("gt") && document.getElementById("gt").checked) {
      for (const q of gtOutline()) {
        const o = 4 * q;
        px[o] = 255; px[o + 1] = 255; px[o + 2] = 255; px[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    document.getElementById("shown").textContent = on.size;
    for (const box of document.querySelectorAll("input.prop")) box.checked = on.has(+box.dataset.i);
  }

  function showBest(n) {
    on.clear();
    for (let i = 0; i < Math.min(n, data.props.length); i++) on.add(i);
    draw();
  }

  const rows = document.getElementById("rows");
  const frag = document.createDocumentFragment();
  data.props.forEach((p, i) => {
    const tr = document.createElement("tr");
    const [r, g, b] = palette(i);
    tr.innerHTML = `<td><input type="checkbox" class="prop" data-i="${i}"></td>` +
      `<td><span class="sw" style="background:rgb(${r},${g},${b})"></span>${i + 1}</td>` +
      `<td>${p[1].toFixed(3)}</td><td>${p[2]}</td>` +
      `<td><button class="solo" data-i="${i}">only</button></td>`;
    frag.appendChild(tr);
  });
  rows.appendChild(frag);
  rows.addEventListener("change", (e) => {
    if (!e.target.classList.contains("prop")) return;
    const i = +e.target.dataset.i;
    if (e.target.checked) on.add(i); else on.delete(i);
    draw();
  });
  rows.addEventListener("click", (e) => {
    if (!e.target.classList.contains("solo")) return;
    on.clear();
    on.add(+e.target.dataset.i);
    draw();
  });
  const topn = document.getElementById("topn");
  topn.addEventListener("input", () => showBest(Math.max(0, +topn.value || 0)));
  const gt = document.getElementById("gt");
  if (gt) gt.addEventListener("change", draw);
  window.deepmaskShown = () => [...on].sort((a, b) => a - b);
  showBest(+topn.value);
})();
