"""The pack's web extension (web/): the live-curve helpers run under Node.js against hand-computed values, and
both modules parse. Skipped without `node` on PATH; the extension inside a real ComfyUI frontend is checked by
tests/comfyui/test_browser.py."""

import json
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB = os.path.join(REPO, "web")
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")


def run_module(tmp_path, script: str):
    """Run `script` (ES module code that can `import ... from "./curves_core.mjs"`) and return its JSON output."""
    shutil.copy(os.path.join(WEB, "curves_core.js"), tmp_path / "curves_core.mjs")
    (tmp_path / "main.mjs").write_text(script, encoding="utf-8")
    done = subprocess.run([NODE, str(tmp_path / "main.mjs")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["curves_core.js", "decoupled_dmd.js"])
def test_modules_parse(tmp_path, name):
    target = tmp_path / (name[:-3] + ".mjs")
    shutil.copy(os.path.join(WEB, name), target)
    done = subprocess.run([NODE, "--check", str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_panels_match_the_servers_curve_quantities(tmp_path):
    from decoupled_dmd.trainer.curves import PANELS

    panels = run_module(tmp_path, 'import { PANELS } from "./curves_core.mjs";\n'
                                  'console.log(JSON.stringify(PANELS));')
    assert [(p["title"], tuple(p["keys"])) for p in panels] == list(PANELS)
    assert [p["log"] for p in panels] == [True, True, False]  # losses and norms: positive, orders apart


def test_log_axis_only_when_every_value_is_positive(tmp_path):
    out = run_module(tmp_path, """
import { PANELS, logSeries, useLog } from "./curves_core.mjs";
const positive = {loss_generator: [[1, 1e-4], [2, 1e-3]], loss_fake: [[1, 10]]};
console.log(JSON.stringify({
  loss: useLog(PANELS[0], positive), zero: useLog(PANELS[0], {loss_generator: [[1, 0], [2, 1]]}),
  empty: useLog(PANELS[0], {}), latents: useLog(PANELS[2], {gen_std: [[1, 2]]}), logged: logSeries(positive)}));
""")
    assert (out["loss"], out["zero"], out["empty"], out["latents"]) == (True, False, False, False)
    assert out["logged"] == {"loss_generator": [[1, -4], [2, -3]], "loss_fake": [[1, 1]]}


def test_store_starts_afresh_for_a_new_run_and_skips_repeated_steps(tmp_path):
    out = run_module(tmp_path, """
import { CurveStore } from "./curves_core.mjs";
const store = new CurveStore();
const seen = [];
seen.push(store.add({run: "a", step: 1, total: 3, values: {loss_generator: 0.5}, text: "step 1/3"}));
seen.push(store.add({run: "a", step: 2, total: 3, values: {loss_generator: 0.4}, text: "step 2/3"}));
seen.push(store.add({run: "a", step: 2, total: 3, values: {loss_generator: 9.0}, text: "again"}));
const before = store.records.map(r => r.step);
seen.push(store.add({run: "b", step: 5, total: 9, values: {loss_generator: 0.1}, text: "step 5/9"}));
console.log(JSON.stringify({seen, before, after: store.records.map(r => [r.step, r.values.loss_generator]),
                            total: store.total, text: store.text}));
""")
    assert out["seen"] == [True, True, False, True]
    assert out["before"] == [1, 2]
    assert out["after"] == [[5, 0.1]] and out["total"] == 9 and out["text"] == "step 5/9"


def test_long_runs_are_thinned_keeping_the_newest_point(tmp_path):
    out = run_module(tmp_path, """
import { CurveStore, MAX_POINTS, thin } from "./curves_core.mjs";
const store = new CurveStore();
for (let step = 1; step <= MAX_POINTS + 1; step++) store.add({run: "a", step, total: 5000, values: {gen_std: step}});
console.log(JSON.stringify({max: MAX_POINTS, count: store.records.length, first: store.records[0].step,
                            last: store.records[store.records.length - 1].step,
                            small: thin([1, 2, 3, 4].map(step => ({step}))).map(r => r.step)}));
""")
    # MAX_POINTS + 1 records: every other one (1, 3, ..., MAX_POINTS + 1) is kept, the newest among them
    assert out["count"] == out["max"] // 2 + 1 and out["first"] == 1 and out["last"] == out["max"] + 1
    assert out["small"] == [1, 3, 4]


def test_series_ranges_and_pixels_by_hand(tmp_path):
    out = run_module(tmp_path, """
import { formatValue, panelRange, panelSeries, toPixel } from "./curves_core.mjs";
const records = [
  {step: 10, values: {loss_generator: 1.0, loss_fake: 3.0}},
  {step: 20, values: {loss_generator: 2.0}},
  {step: 30, values: {loss_generator: 0.0, loss_fake: 1.0}},
];
const series = panelSeries(records, ["loss_generator", "loss_fake", "gen_std"]);
const range = panelRange(series);
const box = {left: 0, top: 0, right: 100, bottom: 30};
const flat = panelRange(panelSeries([{step: 4, values: {gen_std: 0.5}}], ["gen_std"]));
console.log(JSON.stringify({series, range, low: toPixel(10, 0.0, range, box), high: toPixel(30, 3.0, range, box),
  mid: toPixel(20, 1.5, range, box), flat, flatPixel: toPixel(4, 0.5, flat, box), empty: panelRange({}),
  labels: [0, 0.000123, 12345.6, 0.5, 1.23456, -2].map(formatValue)}));
""")
    assert out["series"] == {"loss_generator": [[10, 1.0], [20, 2.0], [30, 0.0]], "loss_fake": [[10, 3.0], [30, 1.0]]}
    assert out["range"] == {"low": 0.0, "high": 3.0, "first": 10, "last": 30}
    assert out["low"] == [0, 30] and out["high"] == [100, 0] and out["mid"] == [50, 15]
    # a constant curve is widened by 1 each way and drawn mid-height, at the left edge of a one-step span
    assert out["flat"] == {"low": -0.5, "high": 1.5, "first": 4, "last": 4} and out["flatPixel"] == [0, 15]
    assert out["empty"] is None
    assert out["labels"] == ["0", "1.2e-4", "1.2e+4", "0.5", "1.23", "-2"]


def test_a_kept_run_is_loaded_and_restored_only_on_its_own_node(tmp_path):
    out = run_module(tmp_path, """
import { CurveStore, runsToRestore } from "./curves_core.mjs";
const kept = {
  "3": {run: "a", output_name: "cat_run", total: 9, text: "step 2/9", records: [
    {step: 1, values: {loss_generator: 1}}, {step: 2, values: {loss_generator: 0.5}}]},
  "7": {run: "b", output_name: "other", total: 2, text: "", records: [{step: 1, values: {}}]},
  "8": {run: "c", output_name: "empty", total: 2, text: "", records: []},
};
const nodes = [{id: 3, outputName: " cat_run "}, {id: 7, outputName: "renamed"}, {id: 8, outputName: "empty"},
               {id: 9, outputName: "cat_run"}];
const chosen = runsToRestore(kept, nodes);
const store = new CurveStore();
store.load(chosen[0][1]);
const continued = store.add({run: "a", step: 3, total: 9, values: {loss_generator: 0.25}, text: "step 3/9"});
const repeated = store.add({run: "a", step: 2, total: 9, values: {}, text: ""});
console.log(JSON.stringify({ids: chosen.map(c => c[0]), steps: store.records.map(r => r.step), continued, repeated,
                            text: store.text, total: store.total, keptUntouched: kept["3"].records.length}));
""")
    # node 3 (same id and output_name, spaces trimmed); not 7 (renamed), 8 (nothing yet) or 9 (nothing kept)
    assert out["ids"] == [3]
    # the live messages of the same run continue the loaded curves; a step already drawn is skipped
    assert out["steps"] == [1, 2, 3] and out["continued"] is True and out["repeated"] is False
    assert out["text"] == "step 3/9" and out["total"] == 9 and out["keptUntouched"] == 2
