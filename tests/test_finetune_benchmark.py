"""The fine-tune benchmark (research/finetune.py): the vega style, its metrics, the summary and gates by hand, and a
tiny run of every code path on the real trainer (a fine-tuned teacher, LoRA students, a warm start)."""

import json
import math

import pytest
import torch

from decoupled_dmd.demo.metrics import high_frequency_energy
from decoupled_dmd.demo.texture import STYLES, background_tint, render, sample_world
from decoupled_dmd.demo.worlds import TextureWorld, get_world
from decoupled_dmd.research import finetune
from decoupled_dmd.research.benchmark import benchmark_main


def test_background_tint_by_hand():
    images = torch.zeros(2, 3, 32, 32)
    images[0, 0], images[0, 2] = 0.6 * 2 - 1, 0.2 * 2 - 1  # red 0.6, blue 0.2 in [0, 1]
    images[1, :] = 0.0
    images[1, 0, 10:20, 10:20] = 1.0  # a red shape away from the frame is not background
    assert background_tint(images).tolist() == pytest.approx([0.2, 0.0], abs=1e-6)


def test_vega_is_the_base_world_with_sepia_backgrounds_and_crisper_marks():
    base, _, attributes = sample_world(256, seed=3)
    vega, _, again = sample_world(256, seed=3, style="vega")
    assert all(torch.equal(attributes[k], again[k]) for k in attributes)  # same scenes, other look
    assert background_tint(base).abs().mean() < 0.02
    expected = torch.tensor([sum(c[0] - c[2] for c in STYLES["vega"].backgrounds.values()) / 6])
    assert background_tint(vega).mean().item() == pytest.approx(expected.item(), abs=0.02)
    assert high_frequency_energy(vega).mean() > 1.3 * high_frequency_energy(base).mean()
    assert torch.equal(render(attributes, torch.Generator().manual_seed(0)),
                       render(attributes, torch.Generator().manual_seed(0), "base"))
    with pytest.raises(ValueError, match="choose one of base, vega"):
        render(attributes, torch.Generator(), "noir")


def test_a_world_spec_rebuilds_the_world_in_a_worker():
    world = TextureWorld("vega", "/some/teacher", "/some/reference.safetensors")
    again = get_world(json.loads(json.dumps(world.spec())))
    assert (again.style, again.teacher_dir, again.reference_file) == ("vega", "/some/teacher",
                                                                       "/some/reference.safetensors")
    assert get_world("texture").style == "base" and get_world("mnist").spec() == "mnist"
    with pytest.raises(ValueError, match="unknown texture style"):
        TextureWorld("noir")


def _run(name, seed, frechets, start=0, every=10, tint=0.5):
    return {"name": name, "seed": seed, "history": [{"step": start + i * every, "frechet": f, "adherence": 0.8,
                                                      "tint_ratio": tint} for i, f in enumerate(frechets)]}


def test_summary_and_gates_by_hand():
    results = [_run("scratch", 0, [900, 600, 500, 400]), _run("scratch", 1, [900, 700, 500, 300]),  # late: 450, 400
               _run("warm", 0, [800, 500, 400, 300], every=5, tint=0.9), _run("warm", 1, [1000, 400, 420, 500],
                                                                             every=5, tint=0.9)]
    summary = finetune.summarize(results, {})
    rows = summary["rows"]
    assert rows["scratch"]["frechet"][0] == pytest.approx(425.0)  # late third of 30 updates: steps 20 and 30
    assert rows["transplanted"]["frechet"][0] == pytest.approx(900.0)  # (iii) before its first update
    assert rows["warm"]["frechet"][0] == pytest.approx((350 + 460) / 2)  # late third of 15: steps 10 and 15
    # like with like: (iii)'s late mean at a quarter of (ii)'s 30 updates (window 5 .. 7.5: step 5; 500 and 400)
    # against (ii)'s late mean at its end (450 and 400): differences 50 and 0, paired by seed
    quarter = summary["warm_at_a_quarter"]
    assert (quarter["warm"], quarter["scratch"]) == (pytest.approx(450.0), pytest.approx(425.0))
    assert quarter["per_seed_difference"] == [pytest.approx(50.0), pytest.approx(0.0)]
    assert quarter["test"]["mean_difference"] == pytest.approx(25.0) and quarter["test"]["n_seeds"] == 2
    # matched budgets: (ii) is evaluated at 10 within (iii)'s 15 updates; at 10 both windows hold step 10 only
    (matched,) = summary["matched_budgets"]
    assert (matched["warm_budget"], matched["scratch"], matched["warm"]) == (10, pytest.approx(650.0),
                                                                             pytest.approx(410.0))
    # (ii) is closer to the fine-tune, but its cast 0.5 is farther from vega's than (i)'s 0.9; (iii) beats (i)
    # on both; (iii) at a quarter of the budget (450) is not as close as (ii) at its end (425)
    assert [g["passed"] for g in summary["gates"]] == [False, True, False]
    assert "(iii) 450.0 at 7.5 updates, (ii) 425.0 at 30" in summary["gates"][-1]["detail"]
    text = finetune.markdown(summary, finetune.MODES["full"], 368.0)
    assert "| (i) base student LoRA on the fine-tune (no training) | 900 ± 100 |" in text


def test_tiny_finetune_benchmark_runs_every_arm(tmp_path):
    out = tmp_path / "bench"
    code = benchmark_main(["--output_dir", str(out), "--finetune", "--finetune_mode", "tiny", "--skip_quality",
                           "--skip_cost", "--skip_speed", "--skip_ca_share", "--jobs", "1", "--cost_threads", "1"])
    assert code == 0
    data = json.loads((out / "finetune.json").read_text())
    rows = data["summary"]["rows"]
    assert set(rows) == {"scratch", "warm", "transplanted"}
    assert all(0 < rows[arm]["frechet"][0] < math.inf and 0 <= rows[arm]["adherence"][0] <= 1 for arm in rows)
    assert all("tint_ratio" in rows[arm] for arm in rows) and set(data["summary"]["teacher"]) == {
        "teacher 4 steps CFG (8 calls)", "teacher 8 steps CFG (16 calls)"}
    teacher = json.loads((out / "finetune" / "teacher_vega" / "model_index.json").read_text())
    assert teacher["style"] == "vega" and teacher["train_steps"] == 2 and "reference" in teacher
    # (iii) started from the base student's LoRA file, and its student records that file's name and hash
    from safetensors import safe_open

    from decoupled_dmd.trainer.formats import file_sha256

    base = json.loads((out / "finetune" / "runs" / "base" / "seed0" / "result.json").read_text())
    warm = json.loads((out / "finetune" / "runs" / "warm" / "seed0" / "result.json").read_text())
    assert warm["settings"]["network_weights"] == base["student_file"]
    # every arm trains with DMD's regression loss (the tiny mode makes 2 pairs of 2 teacher steps)
    assert all(r["settings"]["regression_loss_weight"] == 1.0 and r["settings"]["regression_pairs"] == 2
               for r in (base, warm))
    metrics = (out / "finetune" / "runs" / "warm" / "seed0" / "training" / "logs" / "metrics.jsonl").read_text()
    assert all(json.loads(line)["loss_regression"] > 0 for line in metrics.splitlines())
    with safe_open(warm["student_file"], "pt") as handle:
        metadata = handle.metadata()
    assert metadata["decoupled_dmd.network_weights_sha256"] == file_sha256(base["student_file"])
    assert (out / "finetune.png").stat().st_size > 0
    report = (out / "benchmark.md").read_text()
    assert "## Distil your own fine-tune" in report and "(iii) fine-tune distilled from (i)'s LoRA" in report
