// radsynth reader study: pixel-exact zoom, keyboard shortcuts, reading time. The page works without
// JavaScript (plain radio buttons, the image at a whole-number size); this only makes it faster.
(function () {
  "use strict";

  var ZOOM_KEY = "radsynth-study-zoom";   // "fit" or a whole number of device pixels per image pixel

  function viewer(img) {
    var res = Number(img.dataset.resolution);
    var stage = document.getElementById("stage");
    var label = document.getElementById("zoom-label");
    var tools = document.getElementById("viewer-tools");
    var mode = "fit";
    try { mode = window.sessionStorage.getItem(ZOOM_KEY) || "fit"; } catch (e) { /* storage off: fit */ }

    function dpr() { return window.devicePixelRatio || 1; }
    function fitScale() {
      var top = stage.getBoundingClientRect().top;
      var width = stage.clientWidth;
      var height = Math.max(240, window.innerHeight - Math.max(top, 0) - 24);
      if (window.matchMedia("(max-width: 900px)").matches) { height = width; }
      return Math.max(1, Math.floor(Math.min(width, height) * dpr() / res));
    }
    function scale() { return mode === "fit" ? fitScale() : Math.max(1, parseInt(mode, 10) || 1); }
    function apply() {
      var k = scale();
      var css = res * k / dpr();             // k device pixels per image pixel: every pixel is a k x k block
      img.style.width = css + "px";
      img.style.height = css + "px";
      img.dataset.scale = String(k);
      label.textContent = "\u00d7" + k + (mode === "fit" ? " fit" : "");
      stage.classList.toggle("scroll", css > stage.clientWidth || css > stage.clientHeight);
    }
    function set(next) {
      mode = next;
      try { window.sessionStorage.setItem(ZOOM_KEY, mode); } catch (e) { /* not kept */ }
      apply();
    }
    tools.hidden = false;
    document.getElementById("zoom-in").addEventListener("click", function () { set(String(scale() + 1)); });
    document.getElementById("zoom-out").addEventListener("click", function () { set(String(Math.max(1, scale() - 1))); });
    document.getElementById("zoom-fit").addEventListener("click", function () { set("fit"); });
    window.addEventListener("resize", function () { if (mode === "fit") { apply(); } });
    apply();
    return {
      zoomIn: function () { set(String(scale() + 1)); },
      zoomOut: function () { set(String(Math.max(1, scale() - 1))); },
      fit: function () { set("fit"); }
    };
  }

  function questions(form, zoom) {
    var submit = document.getElementById("submit");
    var missingNote = document.getElementById("missing");
    var elapsed = document.getElementById("elapsed-ms");
    var img = document.getElementById("study-image");
    var keys = document.getElementById("keys");
    var started = null;
    var sending = false;

    function start() { if (started === null) { started = performance.now(); } }
    if (img.complete) { start(); } else { img.addEventListener("load", start); }

    function chosen(name) { return form.querySelector("input[name='" + name + "']:checked"); }
    function missing() {
      var out = [];
      if (!chosen("call")) { out.push("real or synthetic"); }
      if (!chosen("confidence")) { out.push("confidence"); }
      if (!chosen("condition")) { out.push("condition"); }
      return out;
    }
    function refresh() {
      var left = missing();
      submit.disabled = sending || left.length > 0;
      missingNote.textContent = left.length ? "Still to answer: " + left.join(", ") + "." : "";
    }
    function pick(name, key) {
      var input = form.querySelector("input[name='" + name + "'][data-key='" + key + "']");
      if (!input) { return false; }
      input.checked = true;
      input.dispatchEvent(new Event("change", { bubbles: true }));
      return true;
    }

    form.addEventListener("change", refresh);
    form.addEventListener("submit", function (event) {
      if (sending || missing().length) { event.preventDefault(); refresh(); return; }
      start();
      elapsed.value = String(Math.round(performance.now() - started));
      sending = true;
      submit.disabled = true;
      submit.firstChild.textContent = "Saving\u2026 ";
    });
    window.addEventListener("pageshow", function () { sending = false; refresh(); });

    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) { return; }
      var key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
      var handled = true;
      if (key === "r" || key === "s") { handled = pick("call", key); }
      else if (key >= "1" && key <= "5") { handled = pick("confidence", key); }
      else if (key === "Enter") { if (!missing().length && !sending) { form.requestSubmit(); } else { refresh(); } }
      else if (key === "+" || key === "=") { zoom.zoomIn(); }
      else if (key === "-") { zoom.zoomOut(); }
      else if (key === "0") { zoom.fit(); }
      else if (key === "?") { keys.open = !keys.open; }
      else if (key.length === 1 && /[a-z]/.test(key)) { handled = pick("condition", key); }
      else { handled = false; }
      if (handled) { event.preventDefault(); }
    });
    refresh();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var img = document.getElementById("study-image");
    var form = document.getElementById("answer-form");
    if (img && form) { questions(form, viewer(img)); }
    var begin = document.getElementById("begin");
    if (begin) {
      document.addEventListener("keydown", function (event) {
        if (event.key === "Enter" && !event.ctrlKey && !event.metaKey && !event.altKey) { begin.click(); }
      });
    }
  });
})();
