// The slide page: the slide's Deep Zoom tiles in OpenSeadragon, the predicted mask (and the reference) as
// translucent layers placed on the slide's level 0 by their downsample, the outlines drawn over them in SVG,
// and a scale bar in micrometres when the slide records its resolution.
// What has been drawn is written into data- attributes of <body>, which the browser test reads.
// The address can set the controls: ?style=binary&opacity=80&slide=0&mask=1&outlines=0&reference=0.
(function () {
  "use strict";
  const body = document.body;
  const id = body.dataset.id;
  const status = document.getElementById("status");
  const SVG = "http://www.w3.org/2000/svg";
  const counts = {slide: 0, mask: 0, mask_binary: 0, reference: 0};
  const items = {};

  function say(text) { status.textContent = text; }

  function rings(geojson, dx, dy) {
    // Exterior rings and holes of every polygon, as SVG path data in level-0 pixels.
    const out = {exterior: [], hole: []};
    const features = geojson.type === "FeatureCollection" ? geojson.features : [geojson];
    features.forEach(function (feature) {
      const geometry = feature.geometry || feature;
      const polygons = geometry.type === "Polygon" ? [geometry.coordinates]
        : geometry.type === "MultiPolygon" ? geometry.coordinates : [];
      polygons.forEach(function (polygon) {
        polygon.forEach(function (ring, k) {
          if (ring.length < 2) { return; }
          const d = "M" + ring.map(function (p) { return (p[0] + dx) + " " + (p[1] + dy); }).join("L") + "Z";
          (k === 0 ? out.exterior : out.hole).push(d);
        });
      });
    });
    return out;
  }

  function start(info) {
    const width0 = info.width;
    const viewer = OpenSeadragon({
      id: "viewer",
      prefixUrl: "/static/openseadragon/images/",
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "TOP_RIGHT",
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
      crossOriginPolicy: false,
    });
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("id", "outlines");
    const group = document.createElementNS(SVG, "g");
    svg.appendChild(group);
    viewer.canvas.appendChild(svg);
    const scalebar = document.getElementById("scalebar");
    const opacity = document.getElementById("opacity");
    const show = function (name) { return document.getElementById("show-" + name).checked; };

    function pixelsPerLevel0Pixel() {
      const origin = viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
      const one = viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
      return {origin: origin, scale: (one.x - origin.x) / width0};
    }

    function redraw() {
      const at = pixelsPerLevel0Pixel();
      group.setAttribute("transform", "translate(" + at.origin.x + " " + at.origin.y + ") scale(" + at.scale + ")");
      if (info.mpp && at.scale > 0) {
        const umPerPixel = info.mpp / at.scale;
        const wanted = 120 * umPerPixel;
        const power = Math.pow(10, Math.floor(Math.log10(wanted)));
        const nice = [5, 2, 1].map(function (m) { return m * power; }).find(function (v) { return v <= wanted; }) || power;
        scalebar.querySelector(".bar").style.width = Math.round(nice / umPerPixel) + "px";
        scalebar.querySelector(".label").textContent = nice >= 1000 ? (nice / 1000) + " mm" : nice + " µm";
        scalebar.hidden = false;
        body.dataset.scalebar = scalebar.querySelector(".label").textContent;
      }
    }

    function updateDrawn() {
      // The visible layers, once every one of them is fully loaded and the outlines are in (else "").
      const visible = Object.keys(items).filter(function (name) { return items[name].getOpacity() > 0; });
      const done = body.dataset.layers !== undefined && body.dataset.outlinesDrawn === "true" &&
        visible.every(function (name) { return items[name].getFullyLoaded(); });
      body.dataset.drawn = done ? visible.join(" ") : "";
    }

    function applyToggles() {
      const overlay = opacity.value / 100;
      const style = document.getElementById("mask-style").value;
      if (items.slide) { items.slide.setOpacity(show("slide") ? 1 : 0); }
      ["mask", "mask_binary"].forEach(function (name) {
        if (items[name]) { items[name].setOpacity(show("mask") && (name === style || !items.mask_binary) ? overlay : 0); }
      });
      if (items.reference) { items.reference.setOpacity(show("reference") ? overlay : 0); }
      svg.querySelectorAll(".exterior, .hole").forEach(function (p) {
        p.setAttribute("visibility", show("outlines") ? "visible" : "hidden");
      });
      svg.querySelectorAll(".reference").forEach(function (p) {
        p.setAttribute("visibility", show("reference") ? "visible" : "hidden");
      });
      body.dataset.maskOpacity = String(show("mask") ? overlay : 0);
      updateDrawn();
    }

    viewer.addHandler("tile-loaded", function (event) {
      const name = event.tiledImage.gigasegLayer;
      if (name) { counts[name] += 1; body.dataset[name.replace("_b", "B") + "Tiles"] = String(counts[name]); }
    });
    ["animation", "open", "resize", "update-viewport"].forEach(function (e) { viewer.addHandler(e, redraw); });

    const order = ["slide", "mask", "mask_binary", "reference"].filter(function (name) { return info.layers[name]; });
    function addLayer(k) {
      if (k >= order.length) {
        body.dataset.layers = order.join(" ");
        applyToggles();
        redraw();
        return;
      }
      const name = order[k];
      const layer = info.layers[name];
      viewer.addTiledImage({
        tileSource: layer.dzi,
        x: 0,
        y: 0,
        width: layer.width * layer.downsample / width0,
        opacity: name === "slide" ? 1 : 0,
        success: function (event) {
          event.item.gigasegLayer = name;
          items[name] = event.item;
          event.item.addHandler("fully-loaded-change", updateDrawn);
          addLayer(k + 1);
        },
        error: function () { say("the " + name + " layer could not be opened"); addLayer(k + 1); },
      });
    }
    addLayer(0);

    function drawOutlines(url, dx, dy, classes) {
      return fetch(url).then(function (r) { return r.json(); }).then(function (geojson) {
        const found = rings(geojson, dx, dy);
        let paths = 0;
        Object.keys(found).forEach(function (kind) {
          if (!found[kind].length) { return; }
          const path = document.createElementNS(SVG, "path");
          path.setAttribute("d", found[kind].join(""));
          path.setAttribute("fill-rule", "evenodd");
          path.setAttribute("class", classes[kind]);
          group.appendChild(path);
          paths += found[kind].length;
        });
        return paths;
      });
    }
    const offset = info.bounds_offset;
    const drawn = [];
    if (info.outlines) {
      drawn.push(drawOutlines(info.outlines, offset[0], offset[1], {exterior: "exterior", hole: "hole"})
        .then(function (n) { body.dataset.outlineRings = String(n); }));
    }
    if (info.reference_outlines) {
      const r = info.reference_offset;
      drawn.push(drawOutlines(info.reference_outlines, r[0], r[1], {exterior: "reference", hole: "reference"})
        .then(function (n) { body.dataset.referenceRings = String(n); }));
    }
    Promise.all(drawn).then(function () { body.dataset.outlinesDrawn = "true"; applyToggles(); redraw(); });

    const asked = new URLSearchParams(window.location.search);
    ["slide", "mask", "outlines", "reference"].forEach(function (name) {
      if (asked.has(name)) { document.getElementById("show-" + name).checked = asked.get(name) !== "0"; }
    });
    if (asked.get("style") === "binary" && info.layers.mask_binary) { document.getElementById("mask-style").value = "mask_binary"; }
    if (asked.has("opacity")) { opacity.value = String(Math.max(0, Math.min(100, Number(asked.get("opacity")) || 0))); }
    const hasReference = Boolean(info.layers.reference || info.reference_outlines);
    document.getElementById("reference-toggle").hidden = !hasReference;
    document.getElementById("mask-style").hidden = !info.layers.mask_binary;
    ["show-slide", "show-mask", "show-outlines", "show-reference", "mask-style", "opacity"].forEach(function (name) {
      document.getElementById(name).addEventListener("input", applyToggles);
      document.getElementById(name).addEventListener("change", applyToggles);
    });
    const described = info.layers.mask
      ? "mask: " + info.kind + (info.kind === "probability" ? " (threshold " + info.threshold + ")" : "")
      : "no mask";
    say(described + (info.mpp ? " · " + (info.mpp).toFixed(3) + " µm/px" : " · no µm/px recorded"));
  }

  fetch("/api/slide/" + id + ".json")
    .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
    .then(start)
    .catch(function (e) { say("cannot load this slide: " + e); });
})();
