"""benchmarks/bench_images.py at a tiny size: both contenders read every image, the pixels match the processor."""

from __future__ import annotations

import json

import bench_images


def test_tiny_run_reports_both_contenders_and_the_pixel_check(tmp_path):
    out = tmp_path / "images.json"
    assert bench_images.main(["--images", "12", "--shards", "2", "--batch", "4", "--rounds", "1", "--cores", "1",
                              "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["cores"] == 1 and row["usual_img_s"] > 0 and row["mmdist_img_s"] > 0
    assert row["ratio"] == round(row["mmdist_img_s"] / row["usual_img_s"], 2) or abs(
        row["ratio"] - row["mmdist_img_s"] / row["usual_img_s"]) < 0.02
    check = report["pixel_check"]
    assert check["samples"] == 12 and check["mean_levels"] <= 1.5, check  # reduced-scale decode included
    assert "flags" in report["machine"]
    h100 = report["cores_per_gpu"]["H100 SXM"]
    # both figures are rounded from the same unrounded rate: equal to within the rounding
    assert abs(h100["cores_per_gpu"] - h100["images_per_s_per_gpu"] / row["mmdist_per_core"]) <= 0.1
