// A job's charts: score by step, soft-prompt loss curves, budget burn-down.

import { fmtScore, h } from "./dom.js";
import { chart, extent, legend, line, niceTicks, point, seriesColor } from "./plot.js";

function integerTicks(min, max) {
  const ticks = niceTicks(min, max, 8).filter(Number.isInteger);
  return ticks.length ? ticks : [Math.round((min + max) / 2)];
}

// Spreads the candidates of one step across [step - 0.3, step + 0.3] so they do not hide each other.
function stepOffsets(candidates) {
  const byStep = new Map();
  for (const c of candidates) {
    if (!byStep.has(c.step)) byStep.set(c.step, []);
    byStep.get(c.step).push(c);
  }
  const offset = new Map();
  for (const group of byStep.values()) {
    group.forEach((c, i) => offset.set(c.id, group.length > 1 ? (i / (group.length - 1) - 0.5) * 0.6 : 0));
  }
  return offset;
}

// Max of `value` over everything up to each step: [[step, best], ...].
function bestSoFar(candidates, value) {
  const perStep = new Map();
  for (const c of candidates) {
    const v = value(c);
    if (typeof v !== "number") continue;
    perStep.set(c.step, Math.max(perStep.get(c.step) ?? -Infinity, v));
  }
  let best = -Infinity;
  return [...perStep.keys()]
    .sort((a, b) => a - b)
    .map((step) => {
      best = Math.max(best, perStep.get(step));
      return [step, best];
    });
}

// One train-score point per candidate, a second marker for its dev score where measured, the best train score so far.
export function scorePlot(candidates, width) {
  if (!candidates.length) return h("p", { class: "muted", id: "score-plot-empty" }, "No candidates scored yet.");
  const steps = candidates.map((c) => c.step);
  const x0 = Math.min(...steps) - 0.5;
  const x1 = Math.max(...steps) + 0.5;
  const values = candidates.flatMap((c) => [c.score, c.dev_score]);
  const best = bestSoFar(candidates, (c) => c.score);
  const top = best.length ? best[best.length - 1][1] : null;
  const parts = chart({
    width,
    title: "Score by step",
    description: `${candidates.length} candidates over steps ${Math.min(...steps)} to ${Math.max(...steps)}; best train score ${fmtScore(top)}.`,
    x: { domain: [x0, x1], label: "step", ticks: integerTicks(x0, x1) },
    y: { domain: extent(values, { pad: 0.08 }), label: "score" },
  });
  const offsets = stepOffsets(candidates);
  const { sx, sy, plot } = parts;
  if (best.length) plot.append(line(parts, [...best, [x1, top]], { cls: "line best-line", stepped: true }));
  for (const c of candidates) {
    const cx = sx(c.step + offsets.get(c.id));
    plot.append(
      point(cx, sy(c.score), {
        cls: "pt pt-train",
        tip: `#${c.id}, step ${c.step}: train ${fmtScore(c.score)}`,
        attrs: { "data-candidate-id": c.id },
      }),
    );
    if (typeof c.dev_score === "number") {
      plot.append(
        point(cx, sy(c.dev_score), {
          shape: "diamond",
          cls: "pt pt-dev",
          tip: `#${c.id}, step ${c.step}: dev ${fmtScore(c.dev_score)}`,
          attrs: { "data-candidate-id": c.id },
        }),
      );
    }
  }
  return h(
    "div",
    {},
    parts.svg,
    legend([
      { label: "train score (one per candidate)", cls: "pt pt-train", shape: "circle" },
      { label: "dev score, where measured", cls: "pt pt-dev", shape: "diamond" },
      { label: "best train score so far", cls: "line best-line", shape: "line" },
    ]),
  );
}

// Soft-prompt loss by step: one series for BBT, one per layer for BBTv2 (from each candidate's details).
export function lossPlot(candidates, perLayer, width) {
  const withLoss = candidates.filter((c) => typeof c.details?.loss === "number");
  if (!withLoss.length) return h("p", { class: "muted" }, "No losses recorded yet.");
  const seriesOf = (c) => (perLayer && Number.isInteger(c.details.layer) ? c.details.layer : "all");
  const series = new Map();
  for (const c of withLoss) {
    const key = seriesOf(c);
    if (!series.has(key)) series.set(key, []);
    series.get(key).push(c);
  }
  const keys = [...series.keys()].sort((a, b) => (a === "all" ? -1 : b === "all" ? 1 : a - b));
  const color = (key) => (key === "all" ? seriesColor(0) : seriesColor(key));
  const steps = withLoss.map((c) => c.step);
  const x0 = Math.min(...steps) - 0.5;
  const x1 = Math.max(...steps) + 0.5;
  const parts = chart({
    width,
    title: perLayer ? "Loss by step, per layer" : "Loss by step",
    description: `${withLoss.length} soft prompts, ${perLayer ? `${keys.length} layers` : "one search"}; lower is better.`,
    x: { domain: [x0, x1], label: "step", ticks: integerTicks(x0, x1) },
    y: { domain: extent(withLoss.map((c) => c.details.loss), { pad: 0.08 }), label: "loss" },
  });
  for (const key of keys) {
    const group = series.get(key);
    // The curve: the lowest loss of each step this series was searched in.
    const lowest = new Map();
    for (const c of group) lowest.set(c.step, Math.min(lowest.get(c.step) ?? Infinity, c.details.loss));
    const curve = [...lowest.entries()].sort((a, b) => a[0] - b[0]);
    parts.plot.append(line(parts, curve, { cls: "line loss-line", color: color(key) }));
    for (const c of group) {
      const label = key === "all" ? "" : `, layer ${key}`;
      parts.plot.append(
        point(parts.sx(c.step), parts.sy(c.details.loss), {
          size: 2.5,
          cls: "pt pt-loss",
          tip: `#${c.id}, step ${c.step}${label}: loss ${c.details.loss}`,
          attrs: { fill: color(key) },
        }),
      );
    }
  }
  const items = keys.map((key) => ({
    label: key === "all" ? "loss (lowest per step)" : `layer ${key}`,
    cls: "line loss-line",
    shape: "line",
    color: color(key),
  }));
  return h("div", {}, parts.svg, legend(items));
}

// Share of each capped budget left after each step (from the step events' usage and times).
export function burnDownPlot(stepEvents, caps, startedAt, width) {
  const start = startedAt ? new Date(startedAt).getTime() : null;
  const used = {
    calls: (e) => e.usage?.llm_calls,
    tokens: (e) => (e.usage ? e.usage.prompt_tokens + e.usage.completion_tokens : undefined),
    cost: (e) => e.usage?.cost,
    seconds: (e) => (start !== null && e.created_at ? (new Date(e.created_at).getTime() - start) / 1000 : undefined),
  };
  const series = Object.entries(caps).filter(([, cap]) => typeof cap === "number" && cap > 0);
  if (!series.length || !stepEvents.length) return null;
  const steps = stepEvents.map((e) => e.step);
  const x0 = Math.min(...steps);
  const x1 = Math.max(Math.max(...steps), x0 + 1);
  const parts = chart({
    width,
    height: 220,
    title: "Budget left by step",
    description: `Share of each capped budget left after each of ${stepEvents.length} steps.`,
    x: { domain: [x0, x1], label: "step", ticks: integerTicks(x0, x1) },
    y: { domain: [0, 100], label: "% left", format: (v) => `${v}%` },
  });
  const items = [];
  series.forEach(([name, cap], index) => {
    const points = stepEvents
      .map((e) => [e.step, used[name](e)])
      .filter(([, v]) => typeof v === "number")
      .map(([step, v]) => [step, Math.max(0, 100 * (1 - v / cap))]);
    if (!points.length) return;
    const color = seriesColor(index + 3);
    parts.plot.append(line(parts, points, { cls: "line burn-line", color }));
    for (const [step, left] of points) {
      parts.plot.append(
        point(parts.sx(step), parts.sy(left), {
          size: 2.5,
          cls: "pt pt-burn",
          tip: `${name}: ${left.toFixed(0)}% left after step ${step}`,
          attrs: { fill: color },
        }),
      );
    }
    items.push({ label: name, cls: "line burn-line", shape: "line", color });
  });
  return h("div", {}, parts.svg, legend(items));
}
