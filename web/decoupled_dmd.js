// Live training curves on the Decoupled DMD Train node: the server sends one `decoupled_dmd.curves` message per
// student update (nodes/dmd_nodes.py: curve_message); this draws loss, gradient norm and latent mean/std in a
// canvas under the node's widgets while it trains. The final curves stay on the node until the next run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  COLOURS, CurveStore, PANELS, formatValue, logSeries, panelRange, panelSeries, runsToRestore, toPixel, useLog,
} from "./curves_core.js";

const NODE_TYPE = "DecoupledDMD_Train";
const EVENT = "decoupled_dmd.curves";
const STATUS_EVENT = "decoupled_dmd.status"; // how a run ended (nodes/dmd_nodes.py: NodeReporter.end)
const SEVERITY = { finished: "success", stopped: "warn", refused: "error", failed: "error" };
const ROUTE = "/decoupled_dmd/curves";
const PANEL_HEIGHT = 80;
const WIDGET_HEIGHT = PANEL_HEIGHT * PANELS.length;

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  // top-level ids are numbers; a node inside a subgraph arrives as "outer:inner" (not drawn: it has no canvas here)
  const node = graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
  return node && node.type === NODE_TYPE ? node : null;
}

function draw(canvas, store) {
  const scale = window.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth || 300);
  const height = WIDGET_HEIGHT;
  if (canvas.width !== Math.round(width * scale) || canvas.height !== Math.round(height * scale)) {
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  // (the step, loss and time left are the node's progress text, just above)
  PANELS.forEach((panel, index) => {
    const top = index * PANEL_HEIGHT;
    const box = { left: 46, top: top + 14, right: width - 6, bottom: top + PANEL_HEIGHT - 6 };
    const raw = panelSeries(store.records, panel.keys);
    const log = useLog(panel, raw);
    const series = log ? logSeries(raw) : raw;
    const range = panelRange(series);
    ctx.strokeStyle = "#555";
    ctx.lineWidth = 1;
    ctx.strokeRect(box.left, box.top, box.right - box.left, box.bottom - box.top);
    ctx.fillStyle = "#bbb";
    const title = panel.title + (log ? " (log)" : "");
    ctx.fillText(title, box.left, top + 11);
    let legend = box.left + ctx.measureText(title).width + 10;
    panel.keys.forEach((key, k) => {
      ctx.fillStyle = COLOURS[k];
      ctx.fillText(key, legend, top + 11);
      legend += ctx.measureText(key).width + 8;
    });
    if (!range) {
      if (index === 0) {
        ctx.fillStyle = "#888";
        ctx.fillText("waiting for the first update", box.left + 6, box.top + 16);
      }
      return;
    }
    const label = (value) => formatValue(log ? 10 ** value : value);
    ctx.fillStyle = "#999";
    ctx.fillText(label(range.high), 2, box.top + 9);
    ctx.fillText(label(range.low), 2, box.bottom);
    panel.keys.forEach((key, k) => {
      const points = series[key];
      if (!points) return;
      ctx.strokeStyle = COLOURS[k];
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      points.forEach(([step, value], i) => {
        const [x, y] = toPixel(step, value, range, box);
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      if (points.length === 1) {
        const [x, y] = toPixel(points[0][0], points[0][1], range, box);
        ctx.arc(x, y, 1.5, 0, 2 * Math.PI);
      }
      ctx.stroke();
    });
  });
}

function curvesWidget(node) {
  if (node.dmdCurves) return node.dmdCurves;
  const canvas = document.createElement("canvas");
  canvas.className = "decoupled-dmd-curves";
  canvas.style.width = "100%";
  canvas.style.height = `${WIDGET_HEIGHT}px`;
  const store = new CurveStore();
  const height = node.size[1];
  // serialize: false keeps the saved workflow's widgets_values exactly as the node's inputs
  const widget = node.addDOMWidget("live_curves", "decoupled_dmd_curves", canvas, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => WIDGET_HEIGHT + 4,
    getMaxHeight: () => WIDGET_HEIGHT + 4,
  });
  // redraw at the size the node gives it (a restored run is drawn before the canvas is laid out)
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => draw(canvas, store)).observe(canvas);
  widget.serialize = false; // the node's own serialisation reads this, the prompt reads options.serialize
  node.dmdCurves = { canvas, store, widget };
  // grow the node by the curves, so its other widgets (the prompts box) keep their room
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(size[1], height + WIDGET_HEIGHT + 8)]);
  return node.dmdCurves;
}

// Draw the runs the server kept on the Train nodes of the graph now open (after a page load or a workflow
// switch): a run that is still training then goes on live; a finished one stays visible.
async function restore() {
  const graph = app.graph;
  if (!graph) return;
  const nodes = graph._nodes
    .filter((n) => n.type === NODE_TYPE)
    .map((n) => ({ id: n.id, outputName: String(n.widgets?.find((w) => w.name === "output_name")?.value ?? "") }));
  if (!nodes.length) return;
  let kept;
  try {
    const response = await api.fetchApi(ROUTE);
    if (!response.ok) return;
    kept = await response.json();
  } catch {
    return; // an older pack on the server, or no server: live messages still draw
  }
  for (const [id, entry] of runsToRestore(kept, nodes)) {
    const node = findNode(id);
    if (!node) continue;
    const curves = curvesWidget(node);
    if (curves.store.run === entry.run && curves.store.records.length >= entry.records.length) continue;
    curves.store.load(entry);
    draw(curves.canvas, curves.store);
  }
  graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "DecoupledDMD.LiveCurves",
  async afterConfigureGraph() {
    await restore();
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = findNode(detail.node);
      if (!node) return;
      const curves = curvesWidget(node);
      if (curves.store.add(detail)) draw(curves.canvas, curves.store);
      app.graph.setDirtyCanvas(true, false);
    });
    api.addEventListener(STATUS_EVENT, ({ detail }) => {
      // the text is also the node's progress text; the toast reaches a creator looking elsewhere in the graph
      const node = findNode(detail.node);
      if (node?.dmdCurves) node.dmdCurves.store.text = detail.text;
      app.extensionManager?.toast?.add({
        severity: SEVERITY[detail.outcome] ?? "info",
        summary: `Decoupled DMD Train: ${detail.outcome}`,
        detail: detail.text,
        life: detail.outcome === "finished" ? 8000 : 15000,
      });
    });
    await restore();
  },
});
