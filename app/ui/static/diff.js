// Word-level diff (longest common subsequence over whitespace-separated words).

import { h } from "./dom.js";

// Above this many cells in the LCS table the diff is shown as "all removed, all added" (prompts are rarely this long).
const MAX_CELLS = 4_000_000;

// A text as tokens: runs of letters/digits (words) and runs of other non-space characters (punctuation), each with
// the whitespace before it, so "text." and "text" share the word and a diff can be shown with the original spacing.
function tokens(text) {
  return [...text.matchAll(/(\s*)([\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]+)/gu)].map((m) => ({ space: m[1], word: m[2] }));
}

// -> [{op: "same" | "del" | "add", tokens: [...]}, ...]; "same" runs carry the new text's spacing.
export function wordDiff(before, after) {
  const a = tokens(before);
  const b = tokens(after);
  let start = 0;
  while (start < a.length && start < b.length && a[start].word === b[start].word) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1].word === b[endB - 1].word) {
    endA--;
    endB--;
  }
  const ops = [];
  const push = (op, token) => {
    const last = ops[ops.length - 1];
    if (last && last.op === op) last.tokens.push(token);
    else ops.push({ op, tokens: [token] });
  };
  b.slice(0, start).forEach((token) => push("same", token));
  const midA = a.slice(start, endA);
  const midB = b.slice(start, endB);
  const n = midA.length;
  const m = midB.length;
  if ((n + 1) * (m + 1) > MAX_CELLS) {
    midA.forEach((token) => push("del", token));
    midB.forEach((token) => push("add", token));
  } else {
    // lengths[i * width + j]: LCS length of midA[i:] and midB[j:].
    const width = m + 1;
    const lengths = new Uint32Array((n + 1) * width);
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        lengths[i * width + j] =
          midA[i].word === midB[j].word
            ? lengths[(i + 1) * width + j + 1] + 1
            : Math.max(lengths[(i + 1) * width + j], lengths[i * width + j + 1]);
      }
    }
    let i = 0;
    let j = 0;
    while (i < n && j < m) {
      if (midA[i].word === midB[j].word) {
        push("same", midB[j]);
        i++;
        j++;
      } else if (lengths[(i + 1) * width + j] >= lengths[i * width + j + 1]) {
        push("del", midA[i++]);
      } else {
        push("add", midB[j++]);
      }
    }
    while (i < n) push("del", midA[i++]);
    while (j < m) push("add", midB[j++]);
  }
  b.slice(endB).forEach((token) => push("same", token));
  return ops;
}

// The diff as <del>/<ins> runs (struck through / underlined, not colour alone), with the texts' own spacing.
export function renderDiff(before, after) {
  const parts = wordDiff(before, after).map((run) => {
    const text = run.tokens.map((t, i) => (i ? t.space : "") + t.word).join("");
    const space = run.tokens[0].space ? " " : "";
    if (run.op === "same") return space + text;
    return [space, h(run.op === "del" ? "del" : "ins", {}, text)];
  });
  return h("p", { class: "diff" }, parts);
}
