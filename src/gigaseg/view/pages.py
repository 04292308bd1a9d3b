"""The viewer's HTML: the cohort table and the slide page. Scripts and styles are static files (no inline code)."""

from __future__ import annotations

import html
import math
from typing import Any

from gigaseg.view.predictions import Prediction


def _number(value: Any, digits: int) -> tuple[str, str]:
    """(shown text, sort value) of a number that may be missing."""
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "–", ""
    return f"{value:.{digits}f}", repr(float(value))


def _head(title: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title>"
        "<link rel=\"stylesheet\" href=\"/static/viewer.css\"></head>\n"
    )


#: The cohort table's sortable number columns: (key, heading, digits shown).
NUMBER_COLUMNS = (("area", "tissue mm²", 2), ("fraction", "tissue %", 1), ("pieces", "pieces", 0),
                  ("seconds", "seconds", 1), ("dice", "Dice", 4))


def _sortable(key: str, label: str, kind: str) -> str:
    return f"<th data-key=\"{key}\" data-type=\"{kind}\" tabindex=\"0\">{html.escape(label)}</th>"


def cohort_page(predictions: list[Prediction], source: str) -> str:
    """One row a slide: thumbnail, overlay, tissue area and fraction, pieces, seconds, Dice; sorted and filtered by cohort.js."""
    headings = (_sortable("name", "slide", "text") + "<th>thumbnail</th><th>overlay</th>"
                + "".join(_sortable(key, label, "number") for key, label, _ in NUMBER_COLUMNS))
    rows = []
    for p in predictions:
        s = p.summary
        fraction = s.get("tissue_fraction")
        raw = {"area": s.get("tissue_area_mm2"), "fraction": 100 * fraction if isinstance(fraction, (int, float)) else None,
               "pieces": s.get("pieces"), "seconds": s.get("seconds"), "dice": p.dice}
        values = {key: _number(raw[key], digits) for key, _, digits in NUMBER_COLUMNS}
        link = f"/slide/{p.id}"
        thumb = (f"<a href=\"{link}\"><img class=\"thumb\" loading=\"lazy\" alt=\"thumbnail of {html.escape(p.name)}\" "
                 f"src=\"/thumb/{p.id}.jpeg\"></a>") if p.slide else "<span class=\"missing\">no slide</span>"
        overlay = (f"<a href=\"{link}\"><img class=\"overlay\" loading=\"lazy\" alt=\"overlay of {html.escape(p.name)}\" "
                   f"src=\"/files/{p.id}/overlay.png\"></a>") if "overlay.png" in p.files else "<span class=\"missing\">–</span>"
        cells = "".join(f"<td class=\"num\" data-key=\"{key}\" data-value=\"{values[key][1]}\">{values[key][0]}</td>"
                        for key, _, _ in NUMBER_COLUMNS)
        rows.append(
            f"<tr data-id=\"{p.id}\"><td data-key=\"name\" data-value=\"{html.escape(p.name)}\">"
            f"<a href=\"{link}\">{html.escape(p.name)}</a>"
            f"<div class=\"where\">{html.escape(str(p.folder))}</div></td>"
            f"<td>{thumb}</td><td>{overlay}</td>{cells}</tr>"
        )
    return (
        _head("gigaseg: predictions")
        + "<body class=\"cohort\"><header><h1>Predictions</h1>"
        f"<p class=\"source\">{html.escape(source)} · {len(predictions)} slide{'s' if len(predictions) != 1 else ''}</p>"
        "<label>Filter <input id=\"filter\" type=\"search\" size=\"40\" "
        "placeholder=\"name, or e.g. dice&lt;0.9 pieces&gt;=2\"></label> "
        "<span id=\"shown\"></span></header>\n"
        f"<table id=\"cohort\"><thead><tr>{headings}</tr></thead><tbody>\n" + "\n".join(rows)
        + "\n</tbody></table><script src=\"/static/cohort.js\"></script></body></html>\n"
    )


def slide_page(prediction: Prediction) -> str:
    """The slide with its layers in OpenSeadragon (slide.js reads the layers from /api/slide/<id>.json)."""
    s = prediction.summary
    facts = []
    for label, value, digits, unit in (("tissue", s.get("tissue_area_mm2"), 2, " mm²"),
                                       ("fraction", 100 * s["tissue_fraction"] if isinstance(s.get("tissue_fraction"), (int, float)) else None, 1, " %"),
                                       ("pieces", s.get("pieces"), 0, ""), ("Dice", prediction.dice, 4, "")):
        text, _ = _number(value, digits)
        if text != "–":
            facts.append(f"<span>{label} <b>{text}{unit}</b></span>")
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in prediction.notes)
    return (
        _head(f"gigaseg: {prediction.name}")
        + f"<body class=\"slide\" data-id=\"{prediction.id}\"><header><a href=\"/\">← all slides</a>"
        f"<h1>{html.escape(prediction.name)}</h1><span class=\"facts\">{' '.join(facts)}</span></header>\n"
        "<div id=\"controls\">"
        "<label><input type=\"checkbox\" id=\"show-slide\" checked> slide</label>"
        "<label><input type=\"checkbox\" id=\"show-mask\" checked> mask</label>"
        "<select id=\"mask-style\" hidden><option value=\"mask\">probability</option>"
        "<option value=\"mask_binary\">binary</option></select>"
        "<label><input type=\"checkbox\" id=\"show-outlines\" checked> outlines</label>"
        "<label id=\"reference-toggle\" hidden><input type=\"checkbox\" id=\"show-reference\" checked> "
        "<span class=\"swatch reference\"></span>reference</label>"
        "<label>opacity <input type=\"range\" id=\"opacity\" min=\"0\" max=\"100\" value=\"50\"></label>"
        "<span id=\"status\"></span></div>\n"
        + (f"<ul class=\"notes\">{notes}</ul>" if notes else "")
        + "<div id=\"viewer\"><div id=\"scalebar\" hidden><div class=\"bar\"></div><span class=\"label\"></span></div></div>\n"
        "<script src=\"/static/openseadragon/openseadragon.min.js\"></script>"
        "<script src=\"/static/slide.js\"></script></body></html>\n"
    )


def slide_info(prediction: Prediction, layers: dict[str, Any]) -> dict[str, Any]:
    """What slide.js needs: layer descriptors, level-0 size, mpp, outlines and reference."""
    width0, height0 = prediction.level0_size
    if "slide" in layers:
        width0, height0 = layers["slide"]["width"], layers["slide"]["height"]
    reference = prediction.reference
    return {
        "id": prediction.id,
        "name": prediction.name,
        "width": width0,
        "height": height0,
        "mpp": prediction.base_mpp,
        "kind": prediction.summary.get("kind"),
        "threshold": prediction.summary.get("threshold"),
        "bounds_offset": prediction.summary.get("bounds_offset") or [0, 0],
        "layers": layers,
        "outlines": f"/files/{prediction.id}/outlines.geojson" if "outlines.geojson" in prediction.files else None,
        "reference_outlines": (f"/files/{prediction.id}/reference.geojson"
                               if reference is not None and reference.kind == "geojson" else None),
        "reference_offset": list(reference.bounds_offset) if reference is not None else [0, 0],
        "notes": list(prediction.notes),
    }
