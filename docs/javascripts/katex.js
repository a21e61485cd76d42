// Render the maths that pymdownx.arithmatex (generic mode) leaves in the page, with the KaTeX
// copied into site/vendor/ at build time: no network. Inline maths arrives as \( … \) in a
// span.arithmatex, display maths as \[ … \] in a div.arithmatex.
// Same strictness as tools/check_math.mjs; a formula that fails renders as a red .katex-error
// (throwOnError: false), which scripts/check_site.mjs looks for.
"use strict";

// Smallest scale a display is shrunk to so that it fits the text column; below it, it scrolls.
const MIN_SCALE = 0.75;

function renderMath(root) {
  for (const element of root.querySelectorAll(".arithmatex")) {
    const display = element.tagName === "DIV";
    const tex = element.textContent.trim().replace(/^\\[([]/, "").replace(/\\[)\]]$/, "");
    katex.render(tex, element, {
      displayMode: display,
      throwOnError: false,
      strict: "error",
      trust: false,
    });
  }
}

// Shrink a display a little when it is wider than the column (measured once the KaTeX fonts
// are in, since the fallback fonts have other widths), rather than hide its end off-screen.
function fitDisplays(root) {
  for (const element of root.querySelectorAll("div.arithmatex")) {
    element.style.fontSize = "";
    const ratio = element.clientWidth / element.scrollWidth;
    if (ratio < 1) element.style.fontSize = `${Math.max(MIN_SCALE, 0.98 * ratio)}em`;
  }
}

function typeset(root) {
  renderMath(root);
  document.fonts.ready.then(() => fitDisplays(root));
}

// Material re-emits document$ on every page load; plain pages fall back to DOMContentLoaded.
if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => typeset(body));
} else {
  document.addEventListener("DOMContentLoaded", () => typeset(document.body));
}
window.addEventListener("resize", () => fitDisplays(document.body));
