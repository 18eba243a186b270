// Pure helpers of the live-curves extension (no DOM, no ComfyUI): tested with Node by tests/test_web_extension.py.
// The panels mirror trainer/curves.py's PANELS, the image the Train node's `curves` output draws at the end.

// `log`: drawn on a log axis when every value is positive (the generator's loss and the fake's differ by orders of
// magnitude, and a flat line at the bottom of a linear axis hides the generator's).
export const PANELS = [
  { title: "loss", keys: ["loss_generator", "loss_fake"], log: true },
  { title: "gradient norm", keys: ["grad_norm_student", "grad_norm_fake"], log: true },
  { title: "latent mean / std", keys: ["gen_mean", "gen_std"], log: false },
];

export const COLOURS = ["#1f77b4", "#ff7f0e"];

export const MAX_POINTS = 2000; // kept per run: longer runs keep every other point (the shape survives)

// One Train node's curves: records {step, values} from the server's `decoupled_dmd.curves` messages.
export class CurveStore {
  constructor() {
    this.run = null;
    this.records = [];
    this.total = 0;
    this.text = "";
  }

  // Take a run kept by the server (GET /decoupled_dmd/curves: {run, total, text, records}), e.g. after a page
  // reload; the live messages of that run then continue it.
  load(entry) {
    this.run = entry.run;
    this.records = entry.records.map((r) => ({ step: r.step, values: { ...r.values } }));
    this.total = entry.total;
    this.text = entry.text || "";
    if (this.records.length > MAX_POINTS) this.records = thin(this.records);
  }

  // Add one message; a message of another run (a new queue) starts the curves afresh. Returns true when kept.
  add(message) {
    if (message.run !== this.run) {
      this.run = message.run;
      this.records = [];
    }
    const last = this.records[this.records.length - 1];
    if (last && message.step <= last.step) return false; // repeated or out of order: the step is already drawn
    this.records.push({ step: message.step, values: { ...message.values } });
    this.total = message.total;
    this.text = message.text || "";
    if (this.records.length > MAX_POINTS) this.records = thin(this.records);
    return true;
  }
}

// Every other record, always keeping the newest.
export function thin(records) {
  const kept = records.filter((_, index) => index % 2 === 0);
  if (kept[kept.length - 1] !== records[records.length - 1]) kept.push(records[records.length - 1]);
  return kept;
}

// The points of one panel: {key: [[step, value], ...]} for the keys that have finite values.
export function panelSeries(records, keys) {
  const series = {};
  for (const key of keys) {
    const points = records
      .filter((r) => Number.isFinite(r.values[key]))
      .map((r) => [r.step, r.values[key]]);
    if (points.length) series[key] = points;
  }
  return series;
}

// Whether a panel is drawn on a log axis: it asks for one and every value is positive.
export function useLog(panel, series) {
  const values = Object.values(series).flat().map((p) => p[1]);
  return Boolean(panel.log) && values.length > 0 && values.every((v) => v > 0);
}

// The series with log10 values (for a log axis).
export function logSeries(series) {
  const out = {};
  for (const [key, points] of Object.entries(series)) out[key] = points.map(([step, value]) => [step, Math.log10(value)]);
  return out;
}

// Value and step ranges of a panel, widened when flat so a constant curve sits mid-panel.
export function panelRange(series) {
  const points = Object.values(series).flat();
  if (!points.length) return null;
  let low = Math.min(...points.map((p) => p[1]));
  let high = Math.max(...points.map((p) => p[1]));
  if (high - low < 1e-12) {
    low -= 1;
    high += 1;
  }
  const first = Math.min(...points.map((p) => p[0]));
  const last = Math.max(...points.map((p) => p[0]));
  return { low, high, first, last };
}

// Pixel position of (step, value) in a box {left, top, right, bottom}: step grows rightwards, value upwards.
export function toPixel(step, value, range, box) {
  const span = Math.max(range.last - range.first, 1);
  const x = box.left + ((step - range.first) / span) * (box.right - box.left);
  const y = box.bottom - ((value - range.low) / (range.high - range.low)) * (box.bottom - box.top);
  return [x, y];
}

// A short number for the axis labels.
export function formatValue(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  if (size >= 1e4 || size < 1e-3) return value.toExponential(1);
  return Number(value.toPrecision(3)).toString();
}

// The server's kept runs that belong on the graph's Train nodes: same node id and the node's output_name (a
// different workflow that reuses the id is left alone). `nodes`: [{id, outputName}]. Returns [[id, entry], ...].
export function runsToRestore(kept, nodes) {
  const out = [];
  for (const node of nodes) {
    const entry = kept[String(node.id)];
    if (entry && entry.records.length && (entry.output_name || "") === (node.outputName || "").trim()) {
      out.push([node.id, entry]);
    }
  }
  return out;
}
