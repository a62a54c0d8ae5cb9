// Pure helpers of web/surgun_format.js. Run: node --test tests/web/ (also run by tests/test_web.py).
// Named test-*.mjs: the pattern node --test looks for in a folder (test_*.mjs is not one).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  EVENT,
  NODE_CLASS,
  downsample,
  formatNumber,
  formatStats,
  localNodeId,
  sparklinePoints,
} from "../../web/surgun_format.js";

test("event and node class match the Python side", () => {
  const live = readFileSync(new URL("../../nodes/live.py", import.meta.url), "utf8");
  assert.match(live, new RegExp(`^EVENT = "${EVENT.replace(".", "\\.")}"$`, "m"));
  const train = readFileSync(new URL("../../nodes/train_node.py", import.meta.url), "utf8");
  assert.ok(train.includes(`node_id="${NODE_CLASS}"`));
});

test("formatNumber: 4 significant digits, exponent for tiny and huge, dash for missing", () => {
  assert.equal(formatNumber(0.123456), "0.1235");
  assert.equal(formatNumber(-2.5), "-2.5");
  assert.equal(formatNumber(1234.56), "1235");
  assert.equal(formatNumber(0), "0");
  assert.equal(formatNumber(0.00001234), "1.23e-5");
  assert.equal(formatNumber(123456), "1.23e+5");
  for (const bad of [null, undefined, NaN, Infinity, "0.1"]) assert.equal(formatNumber(bad), "–");
});

test("formatStats: step and loss, then the terms present, then erase/retain", () => {
  const u = { node: "7", phase: "train", step: 40, total: 150, loss: 0.5, L_T: 0.25, L_D: 0.125, L_C: -1, L_R: 0.001 };
  assert.equal(formatStats(u), "step 40/150  loss 0.5\nL_T 0.25  L_D 0.125  L_C -1  L_R 0.001");
  assert.equal(
    formatStats({ ...u, erase: 0.9, retain: 0.97 }),
    "step 40/150  loss 0.5\nL_T 0.25  L_D 0.125  L_C -1  L_R 0.001\nerase 0.9  retain 0.97",
  );
  assert.equal(formatStats({ phase: "train", step: 1, total: 2, loss: 1, erase: 0.5 }), "step 1/2  loss 1\nerase 0.5");
  // a null (non-finite on the server) still shows the term, as a dash
  assert.equal(formatStats({ phase: "train", step: 3, total: 9, loss: null, L_R: null }), "step 3/9  loss –\nL_R –");
});

test("formatStats: the image phase shows its own name and no numbers", () => {
  assert.equal(formatStats({ phase: "images", step: 3, total: 12 }), "images 3/12");
});

test("downsample keeps short series and averages long ones into maxPoints buckets", () => {
  assert.deepEqual(downsample([3, 2, 1], 5), [3, 2, 1]);
  assert.deepEqual(downsample([1, 3, 5, 7], 2), [2, 6]);
  const long = Array.from({ length: 10000 }, (_, i) => i);
  const d = downsample(long, 100);
  assert.equal(d.length, 100);
  assert.equal(d[0], 49.5); // mean of 0..99
  assert.equal(d[99], 9949.5); // mean of 9900..9999
  for (let i = 1; i < d.length; i++) assert.ok(d[i] > d[i - 1]);
  // uneven buckets still cover every value exactly once
  const odd = downsample([1, 1, 1, 1, 1, 1, 1], 3);
  assert.deepEqual(odd, [1, 1, 1]);
});

test("downsample drops non-finite values", () => {
  assert.deepEqual(downsample([1, NaN, null, 2, Infinity], 10), [1, 2]);
});

test("sparklinePoints: lowest value at the bottom, highest at the top, x across the width", () => {
  assert.equal(sparklinePoints([0, 1, 0.5], 100, 40), "0,40 50,0 100,20");
  assert.equal(sparklinePoints([], 100, 40), "");
  assert.equal(sparklinePoints([2], 100, 40), "0,20 100,20");
  assert.equal(sparklinePoints([2, 2, 2], 100, 40), "0,20 50,20 100,20");
  assert.equal(sparklinePoints([1, 2, 3], 3, 1), "0,1 1.5,0.5 3,0");
});

test("localNodeId: the last part of a subgraph execution id", () => {
  assert.equal(localNodeId("12"), "12");
  assert.equal(localNodeId(12), "12");
  assert.equal(localNodeId("4:12:7"), "7");
});
