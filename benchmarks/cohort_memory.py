"""Peak memory and disk use of training over a small and a large cohort of same-size regions; prints one JSON object.

For each cohort size a fresh folder gets that many training slides and one validation
slide (byte copies of one generated synthetic slide of exactly the region size, each its own
file), a cohort table, then ``gigaseg-prepare`` and ``gigaseg-train`` (as many optimizer
steps as the largest cohort has regions, for every cohort, with the default augmentation; one
validation at the end) run as the commands a user runs. Peak RSS is the training command's
own; disk is the slides, their masks and the prepared regions.
Example:

    python benchmarks/cohort_memory.py --regions 2 20 --height 2048 --width 8192 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _worker import run_main  # benchmarks/_worker.py, beside this script


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def make_cohort(work: Path, template: Path, template_mask: Path, regions: int) -> Path:
    """``regions`` training slides and one validation slide, copies of the template, and the cohort table."""
    slides = work / "slides"
    slides.mkdir(parents=True)
    rows = ["slide,split,mask_source,mask_path,regions"]
    for i in range(regions + 1):
        name = f"case{i:03d}"
        shutil.copyfile(template, slides / f"{name}.tiff")
        shutil.copyfile(template_mask, slides / f"{name}_mask.tiff")
        split = "val" if i == regions else "train"
        rows.append(f"slides/{name}.tiff,{split},synthetic,slides/{name}_mask.tiff,whole")
    table = work / "cohort.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def command(name: str, work: Path, table: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    """Run a gigaseg command on the cohort in a fresh process; its wall time (s) and peak RSS (MiB)."""
    overrides = [
        "data=slide", "data.slide.path=null", "data.regions={}", "data.name=bench", f"data.dir={work}",
        f"data.table={table}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", f"hydra.run.dir={work / name}",
    ]
    if name == "train":
        overrides += [f"train.steps={steps}", f"train.val_every={steps}", "train.progress=false"]
    code = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(rc)\n"
    )
    # A small fresh parent per command, so the peak of its only child is the command's own.
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, shutil.which(f"gigaseg-{name}") or f"gigaseg-{name}",
                          *overrides, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "GIGASEG_ROOT": str(work)})
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"gigaseg-{name} failed with exit status {out.returncode}")
    return seconds, float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, nargs="+", default=[2, 20], help="cohort sizes (training regions)")
    parser.add_argument("--height", type=int, default=2048, help="region height (a multiple of 64)")
    parser.add_argument("--width", type=int, default=8192, help="region width (a multiple of 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the cohorts here (default: a temporary folder)")
    parser.add_argument("--decoded-cache", action="store_true", help="prepare with data.decoded_cache=true")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    from gigaseg.slides.synthetic import write_synthetic_slide

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="gigaseg-cohort-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    template, template_mask = root / "template.tiff", root / "template_mask.tiff"
    if not template.exists():
        write_synthetic_slide(template, height=args.height, width=args.width, seed=args.seed, mask_path=template_mask)
    extra = ["data.decoded_cache=true"] if args.decoded_cache else []
    results = []
    for regions in args.regions:
        work = root / f"cohort-{regions}"
        shutil.rmtree(work, ignore_errors=True)
        table = make_cohort(work, template, template_mask, regions)
        steps = max(args.regions)  # the same steps for every cohort: only the number of regions differs
        prepare_s, prepare_mb = command("prepare", work, table, steps, extra)
        train_s, train_mb = command("train", work, table, steps, extra)
        slides = folder_bytes(work / "slides", "case???.tiff")
        masks = folder_bytes(work / "slides", "*_mask.tiff")
        prepared = folder_bytes(work / "prepared")
        results.append({
            "regions": regions, "slides": regions + 1, "prepare_s": round(prepare_s, 1),
            "prepare_peak_rss_mb": round(prepare_mb), "train_s": round(train_s, 1),
            "train_peak_rss_mb": round(train_mb), "slides_mb": round(slides / 2**20, 1),
            "label_masks_mb": round(masks / 2**20, 1), "prepared_mb": round(prepared / 2**20, 2),
            "disk_ratio": round((slides + prepared) / slides, 3),
        })
        if not args.json:
            print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "region": [args.height, args.width], "decoded_cache": args.decoded_cache, "cohorts": results,
        "train_rss_ratio": round(max(r["train_peak_rss_mb"] for r in results)
                                 / min(r["train_peak_rss_mb"] for r in results), 3),
        "max_disk_ratio": max(r["disk_ratio"] for r in results),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report))
    if args.work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
