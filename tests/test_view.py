"""``gigaseg-view``: a real prediction of a generated slide served over real HTTP on a free loopback port.

The cohort page, the slide page's layers and their Deep Zoom tiles, the path safety of every
route, the bounded tile cache, the MLflow run form, and the command's start-up and bad input.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT
from PIL import Image

from gigaseg.cli.view import open_viewer
from gigaseg.data.maskfile import TileCache
from gigaseg.errors import ConfigError
from gigaseg.view.server import CONTENT_SECURITY_POLICY, is_loopback


def _command(*args: str, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "gigaseg-view"
    return subprocess.Popen([str(exe) if exe.exists() else "gigaseg-view", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, model):
    """A cohort folder of two real predictions of a generated slide (mpp 0.5): probability and binary, and its truth."""
    from gigaseg.inference import PredictOptions, predict_slide
    from gigaseg.slides.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("view")
    slide = root / "slides" / "case one.tiff"
    slide.parent.mkdir()
    write_synthetic_slide(slide, height=1024, width=2048, seed=3, mpp=0.5, tile_size=256, workers=1,
                          mask_path=slide.with_name("case one_mask.tiff"))
    options = PredictOptions(level=1, tile_size=512, tiff_tile_size=256, min_area_um2=200, progress=False)
    predict_slide(model, slide, root / "cohort" / "0-probability", options)
    from dataclasses import replace

    predict_slide(model, slide, root / "cohort" / "1-binary", replace(options, kind="binary"))
    evaluate_beside(root / "cohort" / "0-probability", slide.with_name("case one_mask.tiff"))
    return root


def evaluate_beside(prediction: Path, reference: Path) -> dict:
    """``gigaseg-evaluate beside_prediction=true`` on the composed config, in process."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from gigaseg.cli.evaluate import run

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="gigaseg.conf", version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"prediction={prediction}", f"reference={reference}",
                                                 "beside_prediction=true", "log_mlflow=false"])
    finally:
        GlobalHydra.instance().clear()
    return run(cfg)


@pytest.fixture(scope="module")
def served(cohort):
    server = open_viewer(str(cohort / "cohort"), None, port=0, cache_mb=8)
    yield server
    server.close()


def get(server, path: str) -> tuple[int, dict, bytes]:
    """A real GET of ``path`` exactly as written (no normalisation by the client)."""
    import http.client

    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_the_cohort_page_has_a_row_a_slide_with_images_numbers_and_links(served):
    status, headers, body = get(served, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert page.count("<tr data-id=") == 2
    assert 'href="/slide/0"' in page and 'href="/slide/1"' in page
    for column in ("tissue mm²", "tissue %", "pieces", "seconds", "Dice"):
        assert column in page
    summary = json.loads(get(served, "/files/0/summary.json")[2])
    assert f'data-value="{float(summary["pieces"])!r}"' in page
    # Dice where gigaseg-evaluate wrote its result beside the prediction, a dash elsewhere.
    dice = json.loads(get(served, "/files/0/evaluation.json")[2])["overall"]["dice"]
    assert f'data-key="dice" data-value="{dice!r}">{dice:.4f}</td>' in page
    assert 'data-key="dice" data-value="">–</td>' in page
    assert get(served, "/files/1/evaluation.json")[0] == 404
    status, headers, thumbnail = get(served, "/thumb/0.jpeg")
    image = Image.open(io.BytesIO(thumbnail))
    assert status == 200 and image.format == "JPEG" and image.size == (256, 128)  # the level of at most two tiles a side
    status, _, overlay = get(served, "/files/1/overlay.png")
    assert status == 200 and Image.open(io.BytesIO(overlay)).format == "PNG"
    assert get(served, "/static/cohort.js")[0] == 200


def test_the_slide_page_has_slide_and_mask_layers_placed_by_the_masks_downsample(served, cohort):
    status, _, page = get(served, "/slide/0")
    assert status == 200 and b"/static/openseadragon/openseadragon.min.js" in page and b"/static/slide.js" in page
    info = json.loads(get(served, "/api/slide/0.json")[2])
    summary = json.loads((cohort / "cohort" / "0-probability" / "summary.json").read_text())
    assert set(info["layers"]) == {"slide", "mask", "mask_binary", "reference"}
    assert (info["width"], info["height"], info["mpp"]) == (2048, 1024, 0.5)
    mask = info["layers"]["mask"]
    assert (mask["width"], mask["height"]) == (summary["width"], summary["height"]) == (512, 256)
    assert mask["downsample"] == summary["downsample"] == 4.0
    assert info["outlines"] == "/files/0/outlines.geojson"
    # A binary prediction has no second, thresholded mask layer.
    assert set(json.loads(get(served, "/api/slide/1.json")[2])["layers"]) == {"slide", "mask"}

    # The evaluation's reference (the generator's truth at level 0) is a layer of its own, on the same level 0.
    reference = info["layers"]["reference"]
    assert (reference["width"], reference["height"], reference["downsample"]) == (2048, 1024, 1.0)

    dzi = get(served, "/dz/0/slide.dzi")[2].decode()
    assert 'TileSize="254"' in dzi and 'Overlap="1"' in dzi and 'Width="2048"' in dzi and 'Format="jpeg"' in dzi
    status, headers, tile = get(served, "/dz/0/slide_files/11/1_1.jpeg")
    image = Image.open(io.BytesIO(tile))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and image.size == (256, 256)
    assert np.asarray(image).std() > 5  # slide pixels, not a blank tile


def test_mask_tiles_are_translucent_pngs_showing_the_predicted_tissue(served, cohort):
    import tifffile

    mask = tifffile.imread(cohort / "cohort" / "1-binary" / "mask.tiff", key=0)
    # Level 9 of a 512x256 mask is the mask at full size: tile (0, 0) is its first 255x255 pixels.
    status, headers, data = get(served, "/dz/1/mask_files/9/0_0.png")
    rgba = np.asarray(Image.open(io.BytesIO(data)))
    assert status == 200 and headers["Content-Type"] == "image/png" and rgba.shape == (255, 255, 4)
    assert np.array_equal(rgba[..., 3] > 0, mask[:255, :255] > 0)
    assert (rgba[mask[:255, :255] > 0, :3] == (0, 200, 0)).all()
    # A coarser level averages the mask: alpha is the tissue's share of each tile pixel.
    coarse = np.asarray(Image.open(io.BytesIO(get(served, "/dz/1/mask_files/8/0_0.png")[2])))
    assert coarse.shape == (128, 255, 4)
    assert abs(coarse[..., 3].mean() - mask[:256, :510].mean()) < 2
    # The probability mask in its colour map: alpha is the probability, the binary layer its threshold.
    # Tile (1, 0) starts one pixel of overlap before the second 254 pixels.
    probability = tifffile.imread(cohort / "cohort" / "0-probability" / "mask.tiff", key=0)
    mapped = np.asarray(Image.open(io.BytesIO(get(served, "/dz/0/mask_files/9/1_0.png")[2])))
    assert np.array_equal(mapped[..., 3], probability[:255, 253:509])
    cut = np.asarray(Image.open(io.BytesIO(get(served, "/dz/0/mask_binary_files/9/1_0.png")[2])))
    assert np.array_equal(cut[..., 3] > 0, probability[:255, 253:509] >= 128)


def test_the_reference_is_drawn_in_its_own_colour(served, cohort):
    import tifffile

    truth = tifffile.imread(cohort / "slides" / "case one_mask.tiff", key=0)
    rgba = np.asarray(Image.open(io.BytesIO(get(served, "/dz/0/reference_files/11/2_1.png")[2])))
    window = truth[253:509, 507:763]
    assert rgba.shape == (256, 256, 4) and window.any() and not window.all()
    assert np.array_equal(rgba[..., 3] > 0, window > 0)
    assert (rgba[window > 0, :3] == (40, 120, 255)).all()


def test_a_slide_that_moved_leaves_the_mask_and_outlines_shown(cohort, tmp_path):
    folder = tmp_path / "cohort" / "moved"
    shutil.copytree(cohort / "cohort" / "1-binary", folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["slide"] = str(tmp_path / "gone.tiff")
    (folder / "summary.json").write_text(json.dumps(summary))
    with open_viewer(str(tmp_path / "cohort"), None) as server:
        info = json.loads(get(server, "/api/slide/0.json")[2])
        assert set(info["layers"]) == {"mask"} and (info["width"], info["height"]) == (2048, 1024)
        assert any("gone.tiff is not there" in note for note in info["notes"])
        assert get(server, "/thumb/0.jpeg")[0] == 404 and get(server, "/dz/0/slide.dzi")[0] == 404
        assert get(server, "/dz/0/mask_files/9/0_0.png")[0] == 200
        assert "no slide" in get(server, "/")[2].decode()


def test_a_geojson_reference_is_served_as_the_exact_file_the_evaluation_names(cohort, tmp_path):
    """QuPath annotations as the reference: drawn as outlines, the one file evaluation.json names, and no other."""
    from gigaseg.outlines import write_geojson

    folder = tmp_path / "cohort" / "annotated"
    shutil.copytree(cohort / "cohort" / "1-binary", folder)
    annotations = tmp_path / "annotations" / "case one.geojson"
    annotations.parent.mkdir()
    write_geojson([[np.array([[100, 100], [900, 100], [900, 700], [100, 700]], float)]], annotations)
    (annotations.parent / "other.geojson").write_text("{}")
    report = evaluate_beside(folder, annotations)
    assert report["paths"]["reference"] == str(annotations.resolve())
    with open_viewer(str(tmp_path / "cohort"), None) as server:
        info = json.loads(get(server, "/api/slide/0.json")[2])
        assert info["reference_outlines"] == "/files/0/reference.geojson" and "reference" not in info["layers"]
        status, headers, body = get(server, "/files/0/reference.geojson")
        assert status == 200 and body == annotations.read_bytes()
        assert headers["Content-Type"] == "application/geo+json"
        assert get(server, "/files/0/other.geojson")[0] == 404
        assert f'data-value="{report["overall"]["dice"]!r}"' in get(server, "/")[2].decode()


BAD_PATHS = [
    "/../summary.json", "/files/0/../../slides/case%20one.tiff", "/files/0/%2e%2e/summary.json",
    "/files/0/..%2fsummary.json", "/files/0/mask.tiff", "/files/0//etc/passwd", "//etc/passwd", "/etc/passwd",
    "/static/../predictions.py", "/static/%2e%2e/server.py", "/static//etc/passwd", "/static/openseadragon/../../server.py",
    "/dz/0/slide_files/11/99_99.jpeg", "/dz/0/slide_files/11/0_0.png", "/dz/1/reference.dzi", "/dz/7/slide.dzi",
    "/slide/2", "/slide/-1", "/thumb/0.png", "/files/0/reference.geojson", "/files/0/summary.json%00.png",
    "http://127.0.0.1/etc/passwd", "/files/0/overlay.png/..",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_anything_but_the_routes_is_404(served, path):
    status, headers, _ = get(served, path)
    assert status == 404
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_links_out_of_a_prediction_folder_are_not_followed(cohort, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    folder = tmp_path / "cohort" / "linked"
    shutil.copytree(cohort / "cohort" / "1-binary", folder)
    (folder / "overlay.png").unlink()
    (folder / "overlay.png").symlink_to(secret)
    # A linked prediction folder outside the given one is not searched either.
    (tmp_path / "cohort" / "elsewhere").symlink_to(cohort / "cohort" / "0-probability", target_is_directory=True)
    with open_viewer(str(tmp_path / "cohort"), None) as server:
        assert len(server.viewer.predictions) == 1
        assert get(server, "/files/0/overlay.png")[0] == 404
        assert get(server, "/files/0/summary.json")[0] == 200
        info = json.loads(get(server, "/api/slide/0.json")[2])
        assert any("leaves the prediction folder" in note for note in info["notes"])
        assert b'src="/files/0/overlay.png"' not in get(server, "/")[2]


def test_every_response_keeps_the_page_from_loading_anything_from_elsewhere(served):
    pages = [get(served, path) for path in ("/", "/slide/0", "/static/slide.js", "/static/cohort.js", "/dz/0/mask.dzi")]
    for status, headers, body in pages:
        assert status == 200
        assert headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
        assert headers["X-Content-Type-Options"] == "nosniff"
    outside = re.compile(rb"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|fetch\(\s*["'](https?:)?//""")
    for _, _, body in pages[:4]:
        assert not outside.search(body)
        # The only address in the scripts is SVG's namespace, a name rather than a place to load from.
        assert set(re.findall(rb"https?://[^\s\"']+", body)) <= {b"http://www.w3.org/2000/svg"}


def test_the_tile_cache_is_bounded_and_drops_the_least_recently_used():
    cache = TileCache(limit=100, sizeof=len, admit_oversized=False)
    for k in range(5):
        cache.put((k,), bytes(30))
        if k >= 1:
            assert cache.get((1,)) is not None  # kept in use
    assert cache.size <= 100 and len(cache) == 3
    assert cache.get((1,)) is not None and cache.get((0,)) is None and cache.get((2,)) is None
    cache.put(("huge",), bytes(101))
    assert cache.get(("huge",)) is None and cache.size <= 100


def test_served_tiles_stay_within_the_cache(served):
    for col in range(8):
        for row in range(4):
            assert get(served, f"/dz/0/slide_files/11/{col}_{row}.jpeg")[0] == 200
    cache = served.viewer.tiles.cache
    assert 0 < cache.size <= cache.limit == 8 * 2**20
    before = cache.hits
    get(served, "/dz/0/slide_files/11/0_0.jpeg")
    assert cache.hits == before + 1


def test_tiles_asked_for_at_once_are_the_tiles_asked_for_one_by_one(cohort):
    """A browser asks for many tiles over several connections: threads share the slide, the masks and the caches."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [f"/dz/{i}/{layer}_files/{level}/{col}_{row}.{ext}" for i in (0, 1)
             for layer, ext, level in (("slide", "jpeg", 11), ("slide", "jpeg", 10), ("mask", "png", 9))
             for col in range(3) for row in range(2)
             if layer == "slide" or col < 2]
    paths += ["/thumb/0.jpeg", "/thumb/1.jpeg", "/dz/0/mask_binary_files/8/0_0.png", "/dz/0/reference_files/11/4_2.png"]
    with open_viewer(str(cohort / "cohort"), None, cache_mb=1) as server:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda path: get(server, path), paths * 2))
    with open_viewer(str(cohort / "cohort"), None, cache_mb=1) as server:
        alone = [get(server, path) for path in paths]
    assert all(status == 200 for status, _, _ in together + alone)
    assert [body for _, _, body in together] == [body for _, _, body in alone] * 2


def test_slides_and_masks_dropped_from_the_open_ones_are_closed(cohort):
    import gc

    from gigaseg.view import find_predictions
    from gigaseg.view.tiles import TileService

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    predictions = find_predictions(cohort / "cohort")
    tiles = TileService(predictions, cache_bytes=2**20, open_sources=1)
    before = open_files()
    for _ in range(3):
        for prediction in predictions:
            for layer in ("slide", "mask", "reference"):
                if layer in tiles.layers(prediction.id):
                    tiles.tile(prediction.id, layer, 9, 0, 0)
    gc.collect()
    assert open_files() <= before + 2  # one open slide (its file and OpenSlide's) at most
    tiles.close()
    gc.collect()
    assert open_files() <= before


def test_hosts_other_than_this_machine_are_told_apart():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("192.168.1.20") and not is_loopback("::") and not is_loopback("example.org")


def test_bad_arguments_are_config_errors(cohort, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        open_viewer(str(cohort), "abc")
    with pytest.raises(ConfigError, match="not neither"):
        open_viewer(None, None)
    with pytest.raises(ConfigError, match="no such folder"):
        open_viewer(str(tmp_path / "nowhere"), None)
    with pytest.raises(ConfigError, match="holds no prediction"):
        open_viewer(str(tmp_path), None)
    with pytest.raises(ConfigError, match="port=70000"):
        open_viewer(str(cohort / "cohort"), None, port=70000)
    with open_viewer(str(cohort / "cohort"), None) as server:
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{server.port} .*port=0 for a free one"):
            open_viewer(str(cohort / "cohort"), None, port=server.port)


def test_the_command_starts_in_about_a_second_without_tensorflow_and_prints_the_url(cohort):
    start = time.monotonic()
    process = _command(f"dir={cohort / 'cohort'}")
    try:
        line = process.stdout.readline()
        seconds = time.monotonic() - start
        assert "gigaseg-view: 2 slides from" in line and "http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/slide/1.json", timeout=30) as response:
            assert json.loads(response.read())["layers"]["mask"]["downsample"] == 4.0
        # About a second on an idle machine; this machine runs benchmarks beside the tests.
        assert seconds < 10, seconds
    finally:
        process.terminate()
        process.wait(timeout=30)
    # SIGTERM stops it as Ctrl-C does: cleanly, with status 0.
    assert process.returncode == 0 and process.stdout.read().strip() == "stopped"
    code = ("import sys, gigaseg.cli.view, gigaseg.view.server, gigaseg.view.tiles, gigaseg.slides;"
            "print(sorted(m for m in ('tensorflow', 'keras', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_bad_input_on_the_command_line_is_one_line(cohort, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([f"dir={tmp_path / 'nowhere'}"], "no such folder"),
        ([f"dir={empty}"], "holds no prediction"),
        ([f"dir={cohort / 'cohort'}", "run_id=abc"], "not both"),
        ([], "not neither"),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    processes = [(_command(*args, env=env, cwd=tmp_path), fragment) for args, fragment in cases]  # at once: 2 cores
    # The MLflow project's entry point runs the same command (MLproject: view).
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["view"]["command"]
    assert entry == "python -m gigaseg.cli.project view {overrides}"
    launcher = [sys.executable, "-m", "gigaseg.cli.project", "view", f"dir={tmp_path / 'nowhere'} port=0"]
    processes.append((subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       cwd=tmp_path), "no such folder"))
    for process, fragment in processes:
        _, stderr = process.communicate(timeout=120)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert process.returncode == 2, stderr
        assert len(errors) == 1 and fragment in errors[0], stderr
        assert "Traceback" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # the viewer writes no run folder, log or store


@pytest.mark.slow
def test_a_predict_run_is_shown_from_its_artifacts_and_says_when_the_mask_was_not_logged(cohort, tmp_path):
    from gigaseg.tracking import MlflowRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = cohort / "cohort" / "0-probability"
    with MlflowRun(uri, "gigaseg", run_name="predict case one", tags={"gigaseg.command": "predict"},
                   artifact_location=str(tmp_path / "artifacts")) as run:
        for name in ("summary.json", "outlines.geojson", "overlay.png"):
            run.log_artifact(folder / name)
    with open_viewer(None, run.run_id, tracking_uri=uri, scratch=tmp_path / "scratch") as server:
        info = json.loads(get(server, "/api/slide/0.json")[2])
        assert set(info["layers"]) == {"slide"}
        assert any("log_mask=true" in note for note in info["notes"])
        assert b"log_mask=true" in get(server, "/slide/0")[2]
        assert get(server, "/dz/0/slide_files/11/0_0.jpeg")[0] == 200
        assert get(server, "/files/0/outlines.geojson")[0] == 200
    with pytest.raises(ConfigError, match="no such run"):
        open_viewer(None, "0123456789abcdef0123456789abcdef", tracking_uri=uri, scratch=tmp_path / "other")
