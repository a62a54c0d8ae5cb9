// SurgUn.LiveLoss: the latest training numbers and a loss sparkline on the "SurgUn Train" node while it runs.
// The server sends one EVENT per step (nodes/live.py); a new run ("execution_start") clears the view.
// A DOM widget, so it shows in both the classic canvas and the Nodes 2.0 (Vue) renderer.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { EVENT, NODE_CLASS, downsample, formatStats, localNodeId, sparklinePoints } from "./surgun_format.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const BOX_W = 200; // sparkline viewBox; the SVG stretches to the node's width
const BOX_H = 40;
const MAX_POINTS = 120; // sparkline points, whatever the number of steps
const WIDGET_HEIGHT = 96; // three 13 px text lines and the sparkline

/** The SurgUn Train node of this execution id in the graph on screen, or null. */
function findTrainNode(executionId) {
  const graph = app.canvas?.graph ?? app.graph;
  const node = graph?.getNodeById?.(localNodeId(executionId));
  return node?.comfyClass === NODE_CLASS ? node : null;
}

/** The live view of a node, added on its first update (the node grows to fit it once). */
function liveView(node) {
  if (node.surgunLive) return node.surgunLive;
  const box = document.createElement("div");
  box.style.cssText =
    "font: 11px/13px monospace; color: var(--input-text, #ddd); white-space: pre-wrap; " +
    "overflow: hidden; padding: 2px 4px;";
  const text = document.createElement("div");
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${BOX_W} ${BOX_H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.style.cssText = `display: block; width: 100%; height: ${BOX_H}px;`;
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#4fc3f7");
  line.setAttribute("stroke-width", "1.5");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(line);
  box.append(text, svg);

  const widget = node.addDOMWidget("surgun_live", "surgun_live", box, {
    serialize: false, // not an input: stays out of the prompt
    hideOnZoom: false,
    getMinHeight: () => WIDGET_HEIGHT,
    getMaxHeight: () => WIDGET_HEIGHT,
  });
  widget.serialize = false; // and out of the saved workflow's widgets_values
  node.surgunLive = { text, line };
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  return node.surgunLive;
}

const runs = new Map(); // execution id -> { losses } of the current run, kept while off screen too
const liveNodes = new Set(); // nodes showing a run, cleared when a new one starts

function onUpdate(update) {
  const id = String(update.node);
  const run = runs.get(id) ?? { losses: [] };
  runs.set(id, run);
  if (update.phase === "train" && typeof update.loss === "number") run.losses.push(update.loss);
  const node = findTrainNode(id);
  if (!node) return; // its graph is not on screen: drawn from the kept history on the next update
  const view = liveView(node);
  liveNodes.add(node);
  view.text.textContent = formatStats(update);
  view.line.setAttribute("points", sparklinePoints(downsample(run.losses, MAX_POINTS), BOX_W, BOX_H));
  node.setDirtyCanvas?.(true, false);
}

function clearAll() {
  runs.clear();
  for (const node of liveNodes) {
    node.surgunLive.text.textContent = "";
    node.surgunLive.line.setAttribute("points", "");
  }
  liveNodes.clear();
}

app.registerExtension({
  name: "SurgUn.LiveLoss",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (detail?.node != null) onUpdate(detail);
    });
    api.addEventListener("execution_start", clearAll);
  },
});
