// Minimal SVG charts: linear axes with ticks, points, lines, a legend. No library.

import { h } from "./dom.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const MARGIN = { left: 54, right: 14, top: 12, bottom: 42 };
let uniqueId = 0;

export function s(tag, attrs = {}, ...children) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) element.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// Round tick values covering [min, max] (steps of 1, 2 or 5 times a power of ten).
export function niceTicks(min, max, count = 5) {
  if (!(max > min)) return [min];
  const rough = (max - min) / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= rough);
  const ticks = [];
  for (let value = Math.ceil(min / step) * step; value <= max + step * 1e-9; value += step) {
    ticks.push(Number(value.toPrecision(12)));
  }
  return ticks;
}

// [min, max] of finite values, widened when they are all equal, with a fraction of padding.
export function extent(values, { pad = 0.05, floor, ceil } = {}) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  let min = finite.length ? Math.min(...finite) : 0;
  let max = finite.length ? Math.max(...finite) : 1;
  if (max === min) {
    const width = Math.abs(max) || 1;
    min -= width * 0.1;
    max += width * 0.1;
  }
  const margin = (max - min) * pad;
  min -= margin;
  max += margin;
  if (floor !== undefined) min = Math.max(min, floor);
  if (ceil !== undefined) max = Math.min(max, ceil);
  return [min, max];
}

function tickLabel(value, format) {
  if (format) return format(value);
  return Math.abs(value) >= 10000 ? `${(value / 1000).toLocaleString("en-US")}k` : value.toLocaleString("en-US");
}

// A chart's width in user units: the width it will be shown at (so its text is drawn at its CSS size on a phone as
// on a desktop), within reason. `element` is where it goes (0 wide while hidden: then `fallback`).
export function fitWidth(element, fallback = 640) {
  const width = element?.clientWidth || fallback;
  return Math.round(Math.min(1000, Math.max(300, width)));
}

// An empty chart with axes; returns the svg, the scales and a group to draw into. `height` defaults to a share of
// `width` (flatter on wide screens, taller on narrow ones).
export function chart({ width = 640, height, x, y, title, description }) {
  height = height || Math.round(Math.min(320, Math.max(220, width * 0.45)));
  const id = `chart-${++uniqueId}`;
  const svg = s("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-labelledby": `${id}-title ${id}-desc`,
    preserveAspectRatio: "xMidYMid meet",
  });
  svg.append(s("title", { id: `${id}-title` }, title), s("desc", { id: `${id}-desc` }, description || title));
  const inner = { left: MARGIN.left, right: width - MARGIN.right, top: MARGIN.top, bottom: height - MARGIN.bottom };
  const [x0, x1] = x.domain;
  const [y0, y1] = y.domain;
  const sx = (value) => inner.left + ((value - x0) / (x1 - x0 || 1)) * (inner.right - inner.left);
  const sy = (value) => inner.bottom - ((value - y0) / (y1 - y0 || 1)) * (inner.bottom - inner.top);
  const axes = s("g", { class: "axes", "aria-hidden": "true" });
  for (const tick of niceTicks(y0, y1, 5)) {
    axes.append(
      s("line", { class: "grid", x1: inner.left, x2: inner.right, y1: sy(tick), y2: sy(tick) }),
      s("text", { class: "tick", x: inner.left - 6, y: sy(tick) + 4, "text-anchor": "end" }, tickLabel(tick, y.format)),
    );
  }
  const xTicks = x.ticks || niceTicks(x0, x1, Math.max(2, Math.floor((inner.right - inner.left) / 80)));
  for (const tick of xTicks) {
    axes.append(
      s("line", { class: "tick-mark", x1: sx(tick), x2: sx(tick), y1: inner.bottom, y2: inner.bottom + 4 }),
      s("text", { class: "tick", x: sx(tick), y: inner.bottom + 17, "text-anchor": "middle" }, tickLabel(tick, x.format)),
    );
  }
  axes.append(
    s("line", { class: "axis", x1: inner.left, x2: inner.right, y1: inner.bottom, y2: inner.bottom }),
    s("line", { class: "axis", x1: inner.left, x2: inner.left, y1: inner.top, y2: inner.bottom }),
    s("text", { class: "axis-label", x: (inner.left + inner.right) / 2, y: height - 6, "text-anchor": "middle" }, x.label),
    s(
      "text",
      {
        class: "axis-label",
        x: -(inner.top + inner.bottom) / 2,
        y: 14,
        transform: "rotate(-90)",
        "text-anchor": "middle",
      },
      y.label,
    ),
  );
  const plot = s("g", { class: "plot" });
  svg.append(axes, plot);
  return { svg, sx, sy, plot, inner };
}

export function point(cx, cy, { shape = "circle", size = 4, cls, tip, attrs = {} } = {}) {
  let element;
  if (shape === "diamond") {
    const r = size + 1;
    element = s("path", { d: `M${cx} ${cy - r}L${cx + r} ${cy}L${cx} ${cy + r}L${cx - r} ${cy}Z`, ...attrs });
  } else if (shape === "square") {
    element = s("rect", { x: cx - size, y: cy - size, width: size * 2, height: size * 2, ...attrs });
  } else {
    element = s("circle", { cx, cy, r: size, ...attrs });
  }
  element.setAttribute("class", cls || "pt");
  if (tip) element.append(s("title", {}, tip));
  return element;
}

// A polyline through [[x, y], ...] in data units; `stepped` draws a staircase (hold the value until the next x).
export function line(chartParts, points, { cls = "line", stepped = false, color } = {}) {
  const { sx, sy } = chartParts;
  let path = "";
  points.forEach(([x, y], index) => {
    const px = sx(x).toFixed(1);
    const py = sy(y).toFixed(1);
    if (index === 0) path = `M${px} ${py}`;
    else if (stepped) path += `H${px}V${py}`;
    else path += `L${px} ${py}`;
  });
  return s("path", { class: cls, d: path, fill: "none", stroke: color });
}

// A legend as an HTML list (wraps on narrow screens); items: {label, cls, shape, color}.
export function legend(items) {
  return h(
    "ul",
    { class: "legend" },
    items.map((item) => {
      const swatch = s("svg", { width: 16, height: 12, viewBox: "0 0 16 12", "aria-hidden": "true" });
      if (item.shape === "line") {
        swatch.append(s("path", { d: "M1 6H15", class: item.cls, stroke: item.color, fill: "none" }));
      } else {
        swatch.append(point(8, 6, { shape: item.shape, size: 4, cls: item.cls, attrs: { fill: item.color } }));
      }
      return h("li", {}, swatch, " ", item.label);
    }),
  );
}

// Distinct colours for series such as layers (golden-angle hues, dark enough for white backgrounds).
export function seriesColor(index) {
  return `hsl(${Math.round((index * 137.508) % 360)} 70% 38%)`;
}
