// web/surgun.js against stand-ins of ComfyUI's app/api and of the DOM (no browser here): the extension
// registers, draws an update on the right node, keeps a run's history and clears on a new run.
// What this cannot show: that ComfyUI's real front end lays out and paints the widget.
import assert from "node:assert/strict";
import { register } from "node:module";
import { test } from "node:test";

// ../../scripts/{app,api}.js are ComfyUI's shims in the browser; here they resolve to the stand-ins below.
const hooks = `
export async function resolve(specifier, context, next) {
  const m = specifier.match(/scripts\\/(app|api)\\.js$/);
  if (!m) return next(specifier, context);
  const src = "export const " + m[1] + " = globalThis.__comfy." + m[1] + ";";
  return { url: "data:text/javascript," + encodeURIComponent(src), shortCircuit: true };
}`;
register("data:text/javascript," + encodeURIComponent(hooks));

function element(tag) {
  return {
    tag, style: {}, attrs: {}, children: [], textContent: "",
    setAttribute(k, v) { this.attrs[k] = String(v); },
    append(...c) { this.children.push(...c); },
  };
}
globalThis.document = { createElement: element, createElementNS: (_ns, tag) => element(tag) };

function trainNode(comfyClass = "SurgUnTrain") {
  return {
    comfyClass, size: [300, 200], widgets: [],
    addDOMWidget(name, type, el, options) {
      const w = { name, type, element: el, options };
      this.widgets.push(w);
      return w;
    },
    computeSize() { return [250, 280]; },
    setSize(s) { this.size = s; },
    setDirtyCanvas() {},
  };
}

const nodes = {};
const listeners = {};
let extension;
globalThis.__comfy = {
  app: {
    registerExtension: (ext) => { extension = ext; },
    canvas: { graph: { getNodeById: (id) => nodes[id] ?? null } },
  },
  api: { addEventListener: (type, fn) => { listeners[type] = fn; } },
};
const send = (type, detail) => listeners[type]({ detail });
const train = (node, step, loss, extra = {}) =>
  send("surgun.train", { node, phase: "train", step, total: 3, loss, L_T: 1, L_D: 2, L_C: 0, L_R: 0, ...extra });
const view = (node) => {
  const [text, svg] = node.widgets[0].element.children;
  return { text: text.textContent, points: svg.children[0].attrs.points };
};

await import("../../web/surgun.js");
await extension.setup();

test("registers SurgUn.LiveLoss and listens for its event and for new runs", () => {
  assert.equal(extension.name, "SurgUn.LiveLoss");
  assert.deepEqual(Object.keys(listeners).sort(), ["execution_start", "surgun.train"]);
});

test("first update adds one unserialised widget and grows the node to fit it", () => {
  nodes["5"] = trainNode();
  send("surgun.train", { node: "5", phase: "images", step: 8, total: 16 });
  train("5", 1, 0.5);
  const n = nodes["5"];
  assert.equal(n.widgets.length, 1);
  assert.equal(n.widgets[0].options.serialize, false); // not sent as an input
  assert.equal(n.widgets[0].serialize, false); // not saved in widgets_values
  assert.deepEqual(n.size, [300, 280]);
  assert.equal(view(n).text, "step 1/3  loss 0.5\nL_T 1  L_D 2  L_C 0  L_R 0");
});

test("the sparkline follows the losses; erase/retain show when sent", () => {
  train("5", 2, 1.5);
  train("5", 3, 1.0, { erase: 0.9, retain: 0.95 });
  const v = view(nodes["5"]);
  assert.equal(v.points, "0,40 100,0 200,20");
  assert.equal(v.text.split("\n")[2], "erase 0.9  retain 0.95");
});

test("other node types and unknown ids are left alone; subgraph ids find the inner node", () => {
  nodes["6"] = trainNode("KSampler");
  train("6", 1, 0.5);
  train("404", 1, 0.5);
  assert.equal(nodes["6"].widgets.length, 0);
  nodes["7"] = trainNode();
  train("3:7", 1, 0.25);
  assert.match(view(nodes["7"]).text, /^step 1\/3 {2}loss 0.25/);
});

test("a run off screen keeps its history; execution_start clears every view", () => {
  train("8", 1, 1);
  train("8", 2, 2); // node 8 not on screen yet
  nodes["8"] = trainNode();
  train("8", 3, 3);
  assert.equal(view(nodes["8"]).points, "0,40 100,20 200,0");
  send("execution_start", { prompt_id: "p" });
  for (const id of ["5", "7", "8"]) assert.deepEqual(view(nodes[id]), { text: "", points: "" });
  train("5", 1, 0.1); // a new run starts a new line
  assert.equal(view(nodes["5"]).points, "0,20 200,20");
});
