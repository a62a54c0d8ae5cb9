// Pure helpers of the SurgUn live view (no DOM, no ComfyUI): unit-tested by tests/web/ with `node --test`.
// ComfyUI also loads this file as an extension module (every .js under web/ is); it only exports.

/** Websocket event sent by nodes/live.py (same name there). */
export const EVENT = "surgun.train";
/** comfyClass of the SurgUn Train node (node_id in nodes/train_node.py). */
export const NODE_CLASS = "SurgUnTrain";
/** Loss terms, on the second line when present in the update (the total, "loss", is on the first). */
export const TERMS = ["L_T", "L_D", "L_C", "L_R"];
/** Third line: how far the concept is erased and how much of the rest is kept, when measured. */
export const SCORES = ["erase", "retain"];

/** A number in at most 4 significant digits; "–" for a missing or non-finite value. */
export function formatNumber(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

/**
 * The text shown on the node for one update {phase, step, total, loss, L_T, ..., erase?, retain?}:
 * "step 40/150  loss 0.1234", then the loss terms, then erase/retain. Absent terms are left out (for
 * example L_R when the retain anchor is off); a null one (non-finite on the server) shows as "–".
 * @returns {string} one to three lines joined by "\n"
 */
export function formatStats(update) {
  const head = update.phase === "train" ? "step" : String(update.phase ?? "");
  let first = `${head} ${update.step ?? "?"}/${update.total ?? "?"}`;
  if ("loss" in update) first += `  loss ${formatNumber(update.loss)}`;
  const lines = [first];
  const terms = TERMS.filter((k) => k in update).map((k) => `${k} ${formatNumber(update[k])}`);
  if (terms.length) lines.push(terms.join("  "));
  const scores = SCORES.filter((k) => update[k] != null).map((k) => `${k} ${formatNumber(update[k])}`);
  if (scores.length) lines.push(scores.join("  "));
  return lines.join("\n");
}

/**
 * At most maxPoints values: the mean of consecutive, near-equal buckets (the first and last values of
 * a long run stay inside the first and last buckets). Non-finite values are dropped first.
 */
export function downsample(values, maxPoints) {
  const v = values.filter((x) => typeof x === "number" && Number.isFinite(x));
  const m = Math.max(1, Math.floor(maxPoints));
  if (v.length <= m) return v;
  const out = [];
  for (let i = 0; i < m; i++) {
    const lo = Math.floor((i * v.length) / m);
    const hi = Math.floor(((i + 1) * v.length) / m);
    let sum = 0;
    for (let j = lo; j < hi; j++) sum += v[j];
    out.push(sum / (hi - lo));
  }
  return out;
}

/**
 * SVG polyline points ("x,y x,y ...") of values in a width x height box, y growing downwards, the
 * smallest value at the bottom. A single value or a flat run is drawn as a level line in the middle.
 */
export function sparklinePoints(values, width, height) {
  const v = values.filter((x) => typeof x === "number" && Number.isFinite(x));
  if (v.length === 0) return "";
  const lo = Math.min(...v);
  const hi = Math.max(...v);
  const y = (x) => (hi === lo ? height / 2 : height - ((x - lo) / (hi - lo)) * height);
  const r = (x) => Math.round(x * 100) / 100;
  if (v.length === 1) return `0,${r(y(v[0]))} ${r(width)},${r(y(v[0]))}`;
  return v.map((x, i) => `${r((i / (v.length - 1)) * width)},${r(y(x))}`).join(" ");
}

/** The node id inside its own graph: ComfyUI runs nodes of subgraphs as "outer:inner" execution ids. */
export function localNodeId(executionId) {
  return String(executionId).split(":").pop();
}
