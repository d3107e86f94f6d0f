// radsynth web: small progressive enhancements; every page works without JavaScript.
document.addEventListener("DOMContentLoaded", function () {
  // Disable the submit button while a request runs, so a double click does not send twice.
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function () {
      var button = form.querySelector("button[type=submit]");
      if (button) {
        button.disabled = true;
        button.dataset.label = button.textContent;
        button.textContent = "Generating…";
      }
    });
  });
  // Re-enable if the page is restored from the back/forward cache.
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("button[disabled]").forEach(function (b) {
      b.disabled = false;
      if (b.dataset.label) { b.textContent = b.dataset.label; }
    });
  });
  // Copy buttons.
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.getElementById(button.dataset.copy);
      input.select();
      if (navigator.clipboard) { navigator.clipboard.writeText(input.value).catch(function () {}); }
      else { document.execCommand("copy"); }
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });
  // Warn early about an oversized file (the server checks again, by content).
  var file = document.getElementById("image");
  if (file && file.dataset.max) {
    file.addEventListener("change", function () {
      var f = file.files[0];
      var help = document.getElementById("image-help");
      if (f && f.size > Number(file.dataset.max)) { help.classList.add("alert"); }
      else if (help) { help.classList.remove("alert"); }
    });
  }
});
